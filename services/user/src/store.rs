//! Every SQL statement of the user service, each once, named after what it
//! does, on the connection (or transaction) it is given.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
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

/// Inserts a user; a taken id (`users_pkey`) or email is a unique
/// violation.
pub(crate) async fn insert_user(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
    email: &Email,
    name: &UserName,
) -> QueryResult<User> {
    diesel::insert_into(users::table)
        .values((
            users::user_id.eq(user_id),
            users::email.eq(email.as_str()),
            users::email_key.eq(email.key()),
            users::name.eq(name.as_str()),
        ))
        .returning(User::as_returning())
        .get_result(conn)
        .await
}

pub(crate) async fn user(conn: &mut AsyncPgConnection, user_id: Uuid) -> QueryResult<Option<User>> {
    users::table
        .find(user_id)
        .select(User::as_select())
        .first(conn)
        .await
        .optional()
}

/// When a user registered: a page's cursor.
pub(crate) async fn registered_at(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
) -> QueryResult<Option<DateTime<Utc>>> {
    users::table
        .find(user_id)
        .select(users::created_at)
        .first(conn)
        .await
        .optional()
}

/// Up to `limit` users in registration order, after the user `after`
/// registered at the given time.
pub(crate) async fn users_page(
    conn: &mut AsyncPgConnection,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> QueryResult<Vec<User>> {
    let mut query = users::table
        .select(User::as_select())
        .order((users::created_at, users::user_id))
        .limit(limit)
        .into_boxed();
    if let Some((cursor, after)) = after {
        query = query.filter(
            users::created_at
                .gt(cursor)
                .or(users::created_at.eq(cursor).and(users::user_id.gt(after))),
        );
    }
    query.load(conn).await
}
