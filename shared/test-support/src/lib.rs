//! Real infrastructure for tests: a `nats-server -js` and a throwaway
//! PostgreSQL cluster, each on a free port with its data in a temporary
//! directory, stopped when its handle is dropped (a panicking test included).
//! The servers themselves are `shop-servers`', named here as tests name them.
//!
//! - [`TestNats`]: one JetStream server per test; [`TestNats::kill`],
//!   [`TestNats::stop`] and [`TestNats::start_again`] keep the port and the
//!   store, for fault tests.
//! - [`TestNatsCluster`]: three (or N) JetStream servers routed to each
//!   other, for replicated streams; each node killed, paused (SIGSTOP) or
//!   restarted on its own.
//! - [`TestPostgres`]: one cluster per test (`initdb`, fsync off); each call to
//!   [`TestPostgres::create_database`] hands out a fresh, empty database.
//! - [`TestInfra`]: both at once, started concurrently, with a signing key
//!   ([`shop_auth::LocalIssuer`]) for the services to trust.
//! - [`setting`]: a test's knob from the environment (cases, seeds).
//!
//! Binaries are found through `NATS_SERVER_BIN` / `PG_BIN_DIR`, on `PATH`, or
//! under `/usr/lib/postgresql/*/bin`; when one is missing, starting fails with
//! one line that says how to install it. PostgreSQL refuses to run as root, so
//! when the tests run as root the cluster runs as the `postgres` user.

pub use shop_servers::{
    Nats as TestNats, NatsCluster as TestNatsCluster, Postgres as TestPostgres,
    ServerError as HarnessError,
};

/// The environment variable `name` parsed, or `default` when it is unset
/// or does not parse: how a test takes its case count or seed.
pub fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// Prepares each `(name, statement)` on a connection to the migrated
/// database at `url`, and panics naming every one that does not prepare (a
/// typo, a column or a function that is not there): statements written as
/// SQL text are so checked against the schema by the tests, not first in
/// production. Preparing parses, resolves and types a statement without
/// running it.
pub async fn assert_statements_prepare(url: &str, statements: &[(&str, &str)]) {
    use diesel_async::{AsyncConnection as _, SimpleAsyncConnection as _};
    let mut conn = diesel_async::AsyncPgConnection::establish(url)
        .await
        .unwrap_or_else(|error| panic!("cannot connect to {url}: {error}"));
    let mut refused = Vec::new();
    for (index, (name, statement)) in statements.iter().enumerate() {
        if let Err(error) = conn
            .batch_execute(&format!("PREPARE checked_{index} AS {statement}"))
            .await
        {
            refused.push(format!("{name}: {error}"));
        }
    }
    assert!(
        refused.is_empty(),
        "statements that do not prepare:\n{}",
        refused.join("\n")
    );
}

/// A NATS server, a PostgreSQL cluster and an identity provider for one
/// test.
#[derive(Debug)]
pub struct TestInfra {
    /// The JetStream server.
    pub nats: TestNats,
    /// The PostgreSQL cluster.
    pub postgres: TestPostgres,
    /// The key the test's services trust (`issuer.auth_config()`) and its
    /// tokens (`admin_token`, `user_token`).
    pub issuer: shop_auth::LocalIssuer,
}

impl TestInfra {
    /// Starts both servers concurrently; panics with a one-line reason if
    /// either cannot start.
    pub async fn start() -> Self {
        Self::start_with_postgres_settings(&[]).await
    }

    /// [`start`](Self::start), with `settings` for PostgreSQL on top of the
    /// harness's ([`TestPostgres::try_start_with_settings`]).
    pub async fn start_with_postgres_settings(settings: &[String]) -> Self {
        let (nats, postgres) = tokio::join!(
            TestNats::try_start(),
            TestPostgres::try_start_with_settings(settings)
        );
        match (nats, postgres) {
            (Ok(nats), Ok(postgres)) => Self {
                nats,
                postgres,
                issuer: shop_auth::LocalIssuer::generate(),
            },
            (Err(error), _) | (_, Err(error)) => panic!("{error}"),
        }
    }
}
