//! The user service's use cases.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection as _, RunQueryDsl};
use shop_db::PgPool;
use shop_messaging::{Outbox, OutgoingEvent};
use shop_proto::user::v1::UserCreated;
use shop_service::{ApiError, Caller, is_unique_violation, timestamp};
use uuid::Uuid;

use crate::domain::{Email, UserName};
use crate::schema::users;

/// A stored user.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = users)]
pub(crate) struct User {
    pub(crate) user_id: Uuid,
    pub(crate) email: String,
    pub(crate) name: String,
    pub(crate) created_at: DateTime<Utc>,
}

/// The use cases, over the service's database and outbox.
#[derive(Clone)]
pub(crate) struct Users {
    pool: PgPool,
    outbox: Outbox,
}

impl Users {
    pub(crate) fn new(pool: PgPool, outbox: Outbox) -> Self {
        Self { pool, outbox }
    }

    /// Registers a user and publishes `user.created`, in one transaction.
    ///
    /// An administrator registers anyone, under a new id. Anyone else
    /// registers themselves: the identity provider has already given them
    /// a subject, and that subject becomes their `user_id`, once. The id is
    /// never taken from the request, so no one can register as someone else.
    pub(crate) async fn create_user(
        &self,
        caller: &Caller,
        email: &str,
        name: &str,
    ) -> Result<User, ApiError> {
        let user_id = if caller.is_admin() {
            Uuid::now_v7()
        } else {
            caller.user_id().ok_or_else(|| {
                ApiError::PermissionDenied(
                    "a customer registers under their token's subject, which must be a UUID".into(),
                )
            })?
        };
        let email = Email::parse(email).map_err(ApiError::InvalidArgument)?;
        let name = UserName::parse(name).map_err(ApiError::InvalidArgument)?;
        let mut conn = self.pool.get().await?;
        let outbox = self.outbox.clone();
        let result = conn
            .transaction::<_, diesel::result::Error, _>(async |conn| {
                let user: User = diesel::insert_into(users::table)
                    .values((
                        users::user_id.eq(user_id),
                        users::email.eq(email.as_str()),
                        users::email_key.eq(email.key()),
                        users::name.eq(name.as_str()),
                    ))
                    .returning(User::as_returning())
                    .get_result(conn)
                    .await?;
                let event = UserCreated {
                    user_id: user.user_id.to_string(),
                    email: user.email.clone(),
                    name: user.name.clone(),
                    created_at: Some(timestamp(user.created_at)),
                };
                outbox
                    .append(
                        conn,
                        &[OutgoingEvent::new(&event).correlated(user.user_id.to_string())],
                    )
                    .await?;
                Ok(user)
            })
            .await;
        match result {
            Ok(user) => {
                self.outbox.committed();
                Ok(user)
            }
            Err(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::UniqueViolation,
                info,
            )) if info.constraint_name() == Some("users_pkey") => Err(ApiError::AlreadyExists(
                format!("user {user_id} is registered already"),
            )),
            Err(error) if is_unique_violation(&error) => Err(ApiError::AlreadyExists(format!(
                "a user with email {} exists already",
                email.as_str()
            ))),
            Err(error) => Err(error.into()),
        }
    }

    /// A user's record: their own, or anyone's for an administrator.
    pub(crate) async fn get_user(&self, caller: &Caller, user_id: Uuid) -> Result<User, ApiError> {
        caller.require_user(user_id)?;
        let mut conn = self.pool.get().await?;
        users::table
            .find(user_id)
            .select(User::as_select())
            .first(&mut conn)
            .await
            .optional()?
            .ok_or_else(|| ApiError::NotFound(format!("no user {user_id}")))
    }

    /// One page of users in registration order, after `after` (the last
    /// user of the previous page).
    pub(crate) async fn list_users(
        &self,
        caller: &Caller,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<User>, ApiError> {
        caller.require_role("ListUsers", &[])?;
        let mut conn = self.pool.get().await?;
        let mut query = users::table
            .select(User::as_select())
            .order((users::created_at, users::user_id))
            .limit(limit)
            .into_boxed();
        if let Some(after) = after {
            let cursor: Option<DateTime<Utc>> = users::table
                .find(after)
                .select(users::created_at)
                .first(&mut conn)
                .await
                .optional()?;
            let cursor = cursor
                .ok_or_else(|| ApiError::InvalidArgument("page_token names no user".into()))?;
            query = query.filter(
                users::created_at
                    .gt(cursor)
                    .or(users::created_at.eq(cursor).and(users::user_id.gt(after))),
            );
        }
        Ok(query.load(&mut conn).await?)
    }
}
