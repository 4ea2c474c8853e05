//! The user service's use cases, validating with [`crate::domain`] and
//! storing with [`crate::store`].

use diesel_async::AsyncConnection as _;
use pg_jetstream::db::PgPool;
use pg_jetstream::{Outbox, envelope::OutgoingEvent};
use shop_proto::user::v1::UserCreated;
use shop_service::{ApiError, Caller, is_unique_violation, timestamp};
use uuid::Uuid;

use crate::domain::{Email, UserName};
use crate::store::{self, User};

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

    /// Registers a user and writes `user.created`, in one transaction; the
    /// event is published after the commit, without holding the reply.
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
                let user = store::insert_user(conn, user_id, &email, &name).await?;
                let event = UserCreated {
                    user_id: user.user_id.to_string(),
                    email: user.email.clone(),
                    name: user.name.clone(),
                    created_at: Some(timestamp(user.created_at)),
                };
                let written = outbox
                    .append(
                        conn,
                        vec![OutgoingEvent::new(&event).correlated(user.user_id.to_string())],
                    )
                    .await?;
                Ok((user, written))
            })
            .await;
        match result {
            Ok((user, written)) => {
                self.outbox.publish_in_background(written);
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
        store::user(&mut conn, user_id)
            .await?
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
        let cursor = match after {
            None => None,
            Some(after) => {
                let registered = store::registered_at(&mut conn, after)
                    .await?
                    .ok_or_else(|| ApiError::InvalidArgument("page_token names no user".into()))?;
                Some((registered, after))
            }
        };
        Ok(store::users_page(&mut conn, cursor, limit).await?)
    }
}
