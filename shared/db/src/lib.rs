//! PostgreSQL plumbing that every service shares.
//!
//! - [`migrate`]: applies embedded diesel migrations at start-up, in order,
//!   skipping those already applied, so several replicas may start at once.
//! - [`pending`]: the migrations not yet applied, read without changing
//!   anything, for a runtime role that may not alter the schema.
//! - [`grant_runtime`]: what a service's runtime role may do on the tables
//!   its owner made: read and write rows, nothing more.
//! - [`pool`]: a deadpool of diesel-async connections.
//! - [`Cached`]: a statement kept prepared that diesel would prepare afresh
//!   each time (updates, multi-row inserts).
//!
//! Services own their SQL under `migrations/<service>/` and embed it with
//! `diesel_migrations::embed_migrations!`.

mod cached;

pub use cached::Cached;

use diesel::migration::MigrationSource;
use diesel::pg::Pg;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::deadpool::Pool;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::{AsyncConnection as _, AsyncPgConnection, SimpleAsyncConnection as _};
use diesel_migrations::MigrationHarness as _;

/// A pool of connections to one service's database.
pub type PgPool = Pool<AsyncPgConnection>;

/// Why the database could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database could not be reached.
    #[error("cannot connect to the database: {0}")]
    Connect(#[from] diesel::ConnectionError),
    /// A migration failed; the transaction it ran in was rolled back.
    #[error("migration failed: {0}")]
    Migrate(String),
    /// The pool could not be built.
    #[error("cannot build the connection pool: {0}")]
    Pool(String),
}

/// Applies the pending migrations of each source in turn and returns the
/// versions applied. Holds a session-level advisory lock meanwhile, so that
/// replicas starting together apply each migration once.
pub async fn migrate<S>(
    database_url: impl AsRef<str>,
    sources: Vec<S>,
) -> Result<Vec<String>, DbError>
where
    S: MigrationSource<Pg> + Send + 'static,
{
    let mut connection = AsyncPgConnection::establish(database_url.as_ref()).await?;
    // Session-level lock: released when this connection closes, even on error.
    connection
        .batch_execute("SELECT pg_advisory_lock(7220189462)")
        .await
        .map_err(|error| DbError::Migrate(format!("cannot take the migration lock: {error}")))?;
    let mut wrapper = AsyncConnectionWrapper::<AsyncPgConnection>::from(connection);
    // diesel's migration harness is synchronous: keep it off the async workers.
    tokio::task::spawn_blocking(move || {
        let mut applied = Vec::new();
        for source in sources {
            let versions = wrapper
                .run_pending_migrations(source)
                .map_err(|error| DbError::Migrate(error.to_string()))?;
            applied.extend(versions.into_iter().map(|version| version.to_string()));
        }
        Ok(applied)
    })
    .await
    .map_err(|error| DbError::Migrate(format!("the migration task failed: {error}")))?
}

/// The versions of the migrations in `sources` that `database_url` has not
/// applied. Only reads, so a role without rights on the schema may ask.
pub async fn pending<S>(database_url: &str, sources: Vec<S>) -> Result<Vec<String>, DbError>
where
    S: MigrationSource<Pg>,
{
    #[derive(diesel::QueryableByName)]
    struct Applied {
        #[diesel(sql_type = diesel::sql_types::Text)]
        version: String,
    }
    let mut connection = AsyncPgConnection::establish(database_url).await?;
    let applied: Vec<Applied> = match diesel_async::RunQueryDsl::load(
        diesel::sql_query("SELECT version FROM __diesel_schema_migrations"),
        &mut connection,
    )
    .await
    {
        Ok(rows) => rows,
        // No migration was ever applied here.
        Err(diesel::result::Error::DatabaseError(_, info))
            if info.message().contains("does not exist") =>
        {
            Vec::new()
        }
        Err(error) => return Err(DbError::Migrate(error.to_string())),
    };
    let applied: std::collections::HashSet<String> =
        applied.into_iter().map(|row| row.version).collect();
    let mut pending = Vec::new();
    for source in sources {
        let migrations = source
            .migrations()
            .map_err(|error| DbError::Migrate(error.to_string()))?;
        for migration in migrations {
            let version = migration.name().version().to_string();
            if !applied.contains(&version) {
                pending.push(version);
            }
        }
    }
    Ok(pending)
}

/// Lets `role` read and write the rows of every table and sequence in the
/// `public` schema of `owner_url`'s database, and read which migrations
/// were applied, and nothing else: it cannot create, alter or drop
/// anything, so the constraints that back the invariants stay. Run as the
/// owner after migrating; new tables of later migrations are granted the
/// same way by default.
pub async fn grant_runtime(owner_url: &str, role: &str) -> Result<(), DbError> {
    let quoted = format!("\"{}\"", role.replace('"', "\"\""));
    let mut connection = AsyncPgConnection::establish(owner_url).await?;
    connection
        .batch_execute(&format!(
            "REVOKE CREATE ON SCHEMA public FROM PUBLIC;
             GRANT USAGE ON SCHEMA public TO {quoted};
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {quoted};
             GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {quoted};
             REVOKE INSERT, UPDATE, DELETE ON __diesel_schema_migrations FROM {quoted};
             ALTER DEFAULT PRIVILEGES IN SCHEMA public
                 GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {quoted};
             ALTER DEFAULT PRIVILEGES IN SCHEMA public
                 GRANT USAGE, SELECT ON SEQUENCES TO {quoted};"
        ))
        .await
        .map_err(|error| DbError::Migrate(format!("granting {role} its rights: {error}")))
}

/// A pool of at most `max_size` connections to `database_url`. Connections
/// are opened lazily, so building the pool does not wait for the database.
/// Waiting for a free connection, opening one and checking one all time out
/// after 5 s, so that a request fails (UNAVAILABLE) instead of hanging while
/// the database is unreachable or the pool is exhausted.
///
/// A connection goes back out without a test query: a closed one (its
/// server gone, its socket shut) or one left in a broken transaction is
/// discarded, and any other failure shows at its first statement, which
/// callers handle anyway. The test query cost one round trip per checkout.
pub fn pool(database_url: &str, max_size: usize) -> Result<PgPool, DbError> {
    let mut config = ManagerConfig::default();
    config.recycling_method = RecyclingMethod::Fast;
    let manager =
        AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(database_url, config);
    let timeout = Some(std::time::Duration::from_secs(5));
    Pool::builder(manager)
        .max_size(max_size)
        .runtime(deadpool::Runtime::Tokio1)
        .wait_timeout(timeout)
        .create_timeout(timeout)
        .recycle_timeout(timeout)
        .build()
        .map_err(|error| DbError::Pool(error.to_string()))
}

/// `database_url` with a server setting for every session opened through
/// it (libpq's `options`), in the URL form (`postgres://...`) or the
/// key-value form (`host=... dbname=...`).
pub fn with_setting(database_url: &str, name: &str, value: &str) -> String {
    if database_url.starts_with("postgres://") || database_url.starts_with("postgresql://") {
        let separator = if database_url.contains('?') { '&' } else { '?' };
        format!("{database_url}{separator}options=-c%20{name}%3D{value}")
    } else {
        format!("{database_url} options='-c {name}={value}'")
    }
}

#[cfg(test)]
mod tests {
    use super::with_setting;

    #[test]
    fn a_setting_joins_either_form_of_url() {
        assert_eq!(
            with_setting("postgres://u@h:5/db", "synchronous_commit", "off"),
            "postgres://u@h:5/db?options=-c%20synchronous_commit%3Doff"
        );
        assert_eq!(
            with_setting("postgres://u@h/db?sslmode=disable", "a", "b"),
            "postgres://u@h/db?sslmode=disable&options=-c%20a%3Db"
        );
        assert_eq!(
            with_setting("host=h dbname=db", "a", "b"),
            "host=h dbname=db options='-c a=b'"
        );
    }
}
