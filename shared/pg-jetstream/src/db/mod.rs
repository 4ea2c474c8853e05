//! PostgreSQL plumbing that every service shares.
//!
//! - [`migrate`]: applies embedded diesel migrations at start-up, in order,
//!   skipping those already applied, so several replicas may start at once.
//! - [`pending`]: the migrations not yet applied, read without changing
//!   anything, for a runtime role that may not alter the schema.
//! - [`connect`]: a connection that waits, for a while, for a database that
//!   cannot be reached yet (the deployment's migration step).
//! - [`grant_runtime`]: what a service's runtime role may do on the tables
//!   its owner made: read and write rows, nothing more.
//! - [`pool`]: a deadpool of diesel-async connections.
//! - [`KeepPrepared`]: a statement kept prepared that diesel would prepare afresh
//!   each time (updates, multi-row inserts).
//! - [`Failure`]: what a failed statement means (unreachable, contention,
//!   timeout, ...), told in one place for the API and the consumers.
//! - [`english_messages`]: makes sure the server's messages, which
//!   [`Failure`] partly reads, are English, or refuses.
//!
//! Services own their SQL under `migrations/<service>/` and embed it with
//! `diesel_migrations::embed_migrations!`.

mod failure;
mod messages;
mod prepared;

pub use failure::{Failure, error_chain};
pub use messages::english_messages;
pub use prepared::KeepPrepared;

use diesel::migration::MigrationSource;
use diesel::pg::Pg;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::deadpool::Pool;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::{AsyncConnection as _, AsyncPgConnection, SimpleAsyncConnection as _};
use diesel_migrations::MigrationHarness as _;
use std::time::Duration;

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
    /// The server's messages are not English and cannot be made so.
    #[error("{0}")]
    Messages(String),
}

impl DbError {
    /// Whether the database could not be reached at all: its name did not
    /// resolve, nothing accepted the connection, or the server is starting
    /// or stopping. Such a failure may pass by itself; a refused login or
    /// a failed migration will not.
    pub fn is_unreachable(&self) -> bool {
        use diesel::result::{DatabaseErrorKind, Error};
        // diesel-async hands a failed connection on as a database error: of
        // no kind (no SQLSTATE) when the server was never reached, else of
        // an unknown kind carrying the server's message.
        let Self::Connect(diesel::ConnectionError::CouldntSetupConfiguration(
            Error::DatabaseError(kind, info),
        )) = self
        else {
            return false;
        };
        match kind {
            DatabaseErrorKind::UnableToSendCommand => true,
            // SQLSTATE 57P03 as an English-speaking server words it (it
            // comes before a session could ask for English).
            _ => {
                info.message()
                    .contains("the database system is starting up")
                    || info
                        .message()
                        .contains("the database system is shutting down")
            }
        }
    }
}

/// A connection to `database_url`, tried again while the database cannot
/// be reached ([`DbError::is_unreachable`]), with a backoff from 250 ms to
/// 5 s, for at most `patience`; any other failure is returned at once.
pub async fn connect(database_url: &str, patience: Duration) -> Result<AsyncPgConnection, DbError> {
    let started = std::time::Instant::now();
    let mut delay = Duration::from_millis(250);
    loop {
        match AsyncPgConnection::establish(database_url)
            .await
            .map_err(DbError::from)
        {
            Err(error) if error.is_unreachable() && started.elapsed() < patience => {
                tracing::warn!(%error, retry_in = ?delay, "the database cannot be reached yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            result => return result,
        }
    }
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
    let connection = AsyncPgConnection::establish(database_url.as_ref()).await?;
    migrate_over(connection, sources).await
}

/// [`migrate`] over a connection already made (by [`connect`], say).
pub async fn migrate_over<S>(
    mut connection: AsyncPgConnection,
    sources: Vec<S>,
) -> Result<Vec<String>, DbError>
where
    S: MigrationSource<Pg> + Send + 'static,
{
    distinct_versions(&sources)?;
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

/// Refuses two migrations of one version, across all `sources`: the
/// database records what it applied by version alone, so the second would
/// be taken for applied and never run.
fn distinct_versions<S: MigrationSource<Pg>>(sources: &[S]) -> Result<(), DbError> {
    let mut seen = std::collections::HashMap::new();
    for source in sources {
        let migrations = source
            .migrations()
            .map_err(|error| DbError::Migrate(error.to_string()))?;
        for migration in migrations {
            let name = migration.name().to_string();
            let version = migration.name().version().to_string();
            if let Some(first) = seen.insert(version.clone(), name.clone()) {
                return Err(DbError::Migrate(format!(
                    "migrations {first} and {name} share the version {version}: the second would never run"
                )));
            }
        }
    }
    Ok(())
}

/// The versions of the migrations in `sources` that `database_url` has not
/// applied. Only reads, so a role without rights on the schema may ask.
pub async fn pending<S>(database_url: &str, sources: Vec<S>) -> Result<Vec<String>, DbError>
where
    S: MigrationSource<Pg>,
{
    let mut connection = AsyncPgConnection::establish(database_url).await?;
    pending_on(&mut connection, sources).await
}

/// [`pending`] over a connection already made (a pooled one, say).
pub async fn pending_on<S>(
    connection: &mut AsyncPgConnection,
    sources: Vec<S>,
) -> Result<Vec<String>, DbError>
where
    S: MigrationSource<Pg>,
{
    #[derive(diesel::QueryableByName)]
    struct Applied {
        #[diesel(sql_type = diesel::sql_types::Text)]
        version: String,
    }
    let applied: Vec<Applied> = match diesel_async::RunQueryDsl::load(
        diesel::sql_query("SELECT version FROM __diesel_schema_migrations"),
        connection,
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
pub async fn grant_runtime(owner: &mut AsyncPgConnection, role: &str) -> Result<(), DbError> {
    let quoted = format!("\"{}\"", role.replace('"', "\"\""));
    owner
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

/// Bounds on how long a pooled session may wait, so that a stuck peer (a
/// paused process holding a row lock, a half-open connection) costs a
/// clear error after a while instead of a hang.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// The longest a statement may run (`statement_timeout`).
    pub statement_timeout: Duration,
    /// The longest a statement may wait for a lock (`lock_timeout`); keep
    /// it below the statement timeout, so that waiting on someone else's
    /// lock reads as such.
    pub lock_timeout: Duration,
    /// How long a session may sit idle inside a transaction before the
    /// server ends it and releases its locks
    /// (`idle_in_transaction_session_timeout`).
    pub idle_in_transaction_timeout: Duration,
    /// After how long without traffic TCP starts probing the other end,
    /// on both sides (then every 10 s, giving up after 3 unanswered).
    pub keepalive_idle: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            statement_timeout: Duration::from_secs(30),
            lock_timeout: Duration::from_secs(5),
            idle_in_transaction_timeout: Duration::from_secs(60),
            keepalive_idle: Duration::from_secs(30),
        }
    }
}

impl SessionLimits {
    /// `database_url` with these limits: server settings for each session
    /// (libpq's `options`; PostgreSQL's side of the keepalives included, so
    /// that the server finds a vanished client too) and the client's TCP
    /// keepalives.
    pub fn apply(&self, database_url: &str) -> String {
        let idle = self.keepalive_idle.as_secs().max(1).to_string();
        let url = with_settings(
            database_url,
            &[
                ("statement_timeout", &millis(self.statement_timeout)),
                ("lock_timeout", &millis(self.lock_timeout)),
                (
                    "idle_in_transaction_session_timeout",
                    &millis(self.idle_in_transaction_timeout),
                ),
                ("tcp_keepalives_idle", &idle),
                ("tcp_keepalives_interval", "10"),
                ("tcp_keepalives_count", "3"),
            ],
        );
        with_params(
            &url,
            &[
                ("keepalives", "1"),
                ("keepalives_idle", &idle),
                ("keepalives_interval", "10"),
                ("keepalives_retries", "3"),
            ],
        )
    }
}

fn millis(duration: Duration) -> String {
    duration.as_millis().to_string()
}

/// A pool of at most `max_size` connections to `database_url`, each session
/// with the default [`SessionLimits`]. Connections are opened lazily, so
/// building the pool does not wait for the database. Waiting for a free
/// connection, opening one and checking one all time out after 5 s, so that
/// a request fails (UNAVAILABLE) instead of hanging while the database is
/// unreachable or the pool is exhausted.
///
/// Each new session is made to speak English before it is handed out
/// (`SHOW lc_messages`, and where it is not English `SET lc_messages TO
/// 'C'`): [`Failure`] reads some failures by their messages. A session
/// whose role may not set it is refused, with an error that names the
/// `ALTER ROLE` that fixes it, rather than used and misread.
///
/// A connection goes back out without a test query: a closed one (its
/// server gone, its socket shut) or one left in a broken transaction is
/// discarded, and any other failure shows at its first statement, which
/// callers handle anyway. The test query cost one round trip per checkout.
///
/// The connection returned last goes out first (deadpool's default is the
/// one returned first, every connection in turn): at low load one session,
/// one server process with warm caches, does the work, and the others stay
/// idle, as PgBouncer hands out its server connections.
pub fn pool(database_url: &str, max_size: usize) -> Result<PgPool, DbError> {
    pool_with_limits(database_url, max_size, &SessionLimits::default())
}

/// [`pool`] with `limits` on every session.
pub fn pool_with_limits(
    database_url: &str,
    max_size: usize,
    limits: &SessionLimits,
) -> Result<PgPool, DbError> {
    let mut config = ManagerConfig::default();
    config.recycling_method = RecyclingMethod::Fast;
    // No session is handed out whose failures would be misread.
    config.custom_setup = Box::new(|url| {
        Box::pin(async move {
            let mut conn = AsyncPgConnection::establish(url).await?;
            messages::english_session(&mut conn)
                .await
                .map_err(|error| diesel::ConnectionError::BadConnection(error.to_string()))?;
            Ok(conn)
        })
    });
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(
        limits.apply(database_url),
        config,
    );
    let timeout = Some(Duration::from_secs(5));
    Pool::builder(manager)
        .max_size(max_size)
        .queue_mode(deadpool::managed::QueueMode::Lifo)
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
    with_settings(database_url, &[(name, value)])
}

/// `database_url` with server settings for every session, added to the
/// `options` it may already carry (a later `options` would replace an
/// earlier one).
pub fn with_settings(database_url: &str, settings: &[(&str, &str)]) -> String {
    let flags: Vec<String> = settings
        .iter()
        .map(|(name, value)| format!("-c {name}={value}"))
        .collect();
    let flags = flags.join(" ");
    if is_url(database_url) {
        let encoded = flags.replace(' ', "%20").replace('=', "%3D");
        let (base, query) = database_url.split_once('?').unwrap_or((database_url, ""));
        let mut found = false;
        let mut pairs: Vec<String> = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| match pair.strip_prefix("options=") {
                Some(existing) if !found => {
                    found = true;
                    format!("options={existing}%20{encoded}")
                }
                _ => pair.to_owned(),
            })
            .collect();
        if !found {
            pairs.push(format!("options={encoded}"));
        }
        format!("{base}?{}", pairs.join("&"))
    } else if let Some(start) = database_url.find("options='") {
        let open = start + "options='".len();
        match database_url[open..].find('\'') {
            Some(close) => format!(
                "{} {flags}{}",
                &database_url[..open + close],
                &database_url[open + close..]
            ),
            None => format!("{database_url} options='{flags}'"),
        }
    } else {
        format!("{database_url} options='{flags}'")
    }
}

/// `database_url` with connection parameters (`keepalives`, ...), in
/// either form; a parameter the URL names already is left as it is.
pub fn with_params(database_url: &str, params: &[(&str, &str)]) -> String {
    let mut url = database_url.to_owned();
    for (key, value) in params {
        if is_url(&url) {
            let query = url.split_once('?').map_or("", |(_, query)| query);
            if query
                .split('&')
                .any(|pair| pair.split('=').next() == Some(key))
            {
                continue;
            }
            let separator = if url.contains('?') { '&' } else { '?' };
            url = format!("{url}{separator}{key}={value}");
        } else {
            if url
                .split_whitespace()
                .any(|pair| pair.split('=').next() == Some(key))
            {
                continue;
            }
            url = format!("{url} {key}={value}");
        }
    }
    url
}

fn is_url(database_url: &str) -> bool {
    database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")
}

#[cfg(test)]
mod tests {
    use super::{SessionLimits, distinct_versions, with_params, with_setting, with_settings};

    /// A folder of migrations under `root` named `names`, each creating
    /// nothing.
    fn migrations(
        root: &std::path::Path,
        names: &[&str],
    ) -> diesel_migrations::FileBasedMigrations {
        let dir = root.join(uuid::Uuid::new_v4().to_string());
        for name in names {
            std::fs::create_dir_all(dir.join(name)).unwrap();
            std::fs::write(dir.join(name).join("up.sql"), "SELECT 1;").unwrap();
            std::fs::write(dir.join(name).join("down.sql"), "SELECT 1;").unwrap();
        }
        diesel_migrations::FileBasedMigrations::from_path(&dir).unwrap()
    }

    #[test]
    fn two_migrations_of_one_version_are_refused_whichever_sources_they_are_in() {
        let root = std::env::temp_dir().join(format!("pg-jetstream-db-{}", uuid::Uuid::new_v4()));
        let runtime = migrations(
            &root,
            &["2026-12-07-000000_outbox", "2026-12-08-000000_inbox"],
        );
        let service = migrations(&root, &["2026-12-07-000000_bookings"]);
        let error = distinct_versions(&[runtime, service])
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "migration failed: migrations 2026-12-07-000000_outbox and \
             2026-12-07-000000_bookings share the version 20261207000000: \
             the second would never run"
        );
        let apart = [
            migrations(&root, &["2026-12-07-000000_outbox"]),
            migrations(&root, &["2026-12-07-000001_bookings"]),
        ];
        distinct_versions(&apart).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
    }

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

    #[test]
    fn settings_join_the_options_already_there() {
        assert_eq!(
            with_setting(&with_setting("postgres://u@h/db", "a", "b"), "c", "d"),
            "postgres://u@h/db?options=-c%20a%3Db%20-c%20c%3Dd"
        );
        assert_eq!(
            with_settings("host=h options='-c a=b' dbname=db", &[("c", "d")]),
            "host=h options='-c a=b -c c=d' dbname=db"
        );
    }

    #[test]
    fn params_do_not_override_the_urls_own() {
        assert_eq!(
            with_params(
                "postgres://h/db?keepalives_idle=5",
                &[("keepalives_idle", "30"), ("keepalives", "1")]
            ),
            "postgres://h/db?keepalives_idle=5&keepalives=1"
        );
        assert_eq!(
            with_params(
                "host=h keepalives=0",
                &[("keepalives", "1"), ("keepalives_idle", "30")]
            ),
            "host=h keepalives=0 keepalives_idle=30"
        );
    }

    #[test]
    fn the_limits_parse_as_a_connection_string() {
        let url = SessionLimits::default().apply("postgres://u:p@h:5432/db?sslmode=disable");
        assert!(url.contains("lock_timeout%3D5000"), "{url}");
        assert!(url.contains("statement_timeout%3D30000"), "{url}");
        assert!(url.contains("&keepalives_idle=30"), "{url}");
    }
}
