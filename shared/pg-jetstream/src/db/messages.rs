//! The language PostgreSQL answers in.
//!
//! [`Failure::of`](crate::db::Failure::of) tells most failures apart by the
//! SQLSTATE that diesel-async keeps (unique, serialisation, closed
//! connection), but diesel-async 0.9 reports every other code as `Unknown`
//! with only the server's message: its error wrapper is private and diesel's
//! `DatabaseErrorInformation` has no accessor for the code (one is proposed
//! upstream, diesel-rs/diesel#5232). Deadlocks, lock and statement timeouts,
//! numeric overflow and a server going away are therefore told by their
//! messages, which PostgreSQL translates per `lc_messages`. A server
//! answering in German would make a deadlock a permanent failure that ends
//! in the dead-letter queue. So a service makes sure its sessions speak
//! English before it starts, and refuses to start when they cannot.

use diesel::result::Error;
use diesel_async::{AsyncConnection as _, AsyncPgConnection, SimpleAsyncConnection as _};

use super::DbError;

/// `database_url`, set up so that every session's messages are English:
/// unchanged when the server already answers in English, otherwise with
/// `lc_messages=C` for every session when the role may set it (a
/// superuser, or `GRANT SET ON PARAMETER lc_messages`). Otherwise an error
/// that says how to fix it.
pub async fn english_messages(database_url: &str) -> Result<String, DbError> {
    let mut conn = AsyncPgConnection::establish(database_url).await?;
    let Some(answer) = probe(&mut conn).await? else {
        return Ok(database_url.to_owned());
    };
    match conn.batch_execute("SET lc_messages TO 'C'").await {
        Ok(()) if probe(&mut conn).await?.is_none() => {
            Ok(super::with_setting(database_url, "lc_messages", "C"))
        }
        _ => Err(refusal(&answer)),
    }
}

/// Makes one new session's messages English, as every pool of
/// [`pool`](super::pool) does before it hands a session out: nothing to
/// do when its setting is already English (one `SHOW`, no error in the
/// server's log), else `SET lc_messages TO 'C'` where the role may;
/// otherwise the error that says how to fix it, so that no session whose
/// failures would be misread is ever used.
pub(super) async fn english_session(conn: &mut AsyncPgConnection) -> Result<(), DbError> {
    #[derive(diesel::QueryableByName)]
    struct Setting {
        #[diesel(sql_type = diesel::sql_types::Text)]
        lc_messages: String,
    }
    let shown: Vec<Setting> =
        diesel_async::RunQueryDsl::load(diesel::sql_query("SHOW lc_messages"), conn)
            .await
            .map_err(|error| {
                DbError::Messages(format!("reading the session's lc_messages: {error}"))
            })?;
    if shown.iter().any(|setting| english(&setting.lc_messages)) {
        return Ok(());
    }
    // Unset (the server's environment decides) or another language.
    let Some(answer) = probe(conn).await? else {
        return Ok(());
    };
    match conn.batch_execute("SET lc_messages TO 'C'").await {
        Ok(()) if probe(conn).await?.is_none() => Ok(()),
        _ => Err(refusal(&answer)),
    }
}

/// Whether an `lc_messages` setting is English by its name.
fn english(setting: &str) -> bool {
    let name = setting.to_ascii_lowercase();
    name == "c" || name == "posix" || name.starts_with("c.") || name.starts_with("en_")
}

fn refusal(answer: &str) -> DbError {
    DbError::Messages(format!(
        "PostgreSQL answers this role in another language than English (\"{answer}\" for \
         \"division by zero\"), and failures (deadlocks, lock timeouts, lost connections) \
         are told apart by the server's messages; as a superuser, run \
         `ALTER ROLE <this role> SET lc_messages TO 'C'` (or `GRANT SET ON PARAMETER \
         lc_messages TO <this role>`)"
    ))
}

/// `None` when the session's messages are English; else what it said
/// instead of "division by zero" (22012).
async fn probe(conn: &mut AsyncPgConnection) -> Result<Option<String>, DbError> {
    match conn.batch_execute("SELECT 1 / 0").await {
        Err(Error::DatabaseError(_, info)) if info.message() == "division by zero" => Ok(None),
        Err(Error::DatabaseError(_, info)) => Ok(Some(info.message().to_owned())),
        Err(error) => Err(DbError::Messages(format!(
            "probing the server's message language: {error}"
        ))),
        Ok(()) => Err(DbError::Messages(
            "probing the server's message language: 1 / 0 succeeded".into(),
        )),
    }
}
