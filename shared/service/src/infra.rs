//! A service's start-up: the token verifier, the database (migrations
//! applied or checked, its English messages, the pools), NATS and the
//! streams, the outbox; and the deployment's migration step.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use diesel_migrations::EmbeddedMigrations;
use pg_jetstream::db::PgPool;
use pg_jetstream::{Messaging, MessagingBuilder, telemetry::MessagingMetrics};
use prometheus_client::registry::Registry;
use secrecy::ExposeSecret as _;

use crate::Identity;
use crate::config::{Migrations, ServiceConfig};
use crate::probes;

/// How long the migration step waits for a database it cannot reach yet.
const MIGRATION_PATIENCE: Duration = Duration::from_secs(60);

/// The deployment's migration step: applies the messaging tables' and
/// `migrations` as the database's owner (`config.database_url`), then
/// grants `config.grant_to`, the runtime role, the rows and nothing more.
///
/// A step runs once, as its stack starts, so a database that cannot be
/// reached yet (its name not resolvable yet, nothing listening, still
/// starting) is the usual case, not a fault: each connection is tried
/// again for at most [`MIGRATION_PATIENCE`]. Anything else, a refused
/// password among them, ends the step at once.
pub async fn migrate_only(
    config: &ServiceConfig,
    migrations: EmbeddedMigrations,
) -> anyhow::Result<()> {
    let url = config.database_url.expose_secret();
    let connection = pg_jetstream::db::connect(url, MIGRATION_PATIENCE).await?;
    let applied =
        pg_jetstream::db::migrate_over(connection, vec![pg_jetstream::MIGRATIONS, migrations])
            .await
            .context("migrating the database")?;
    tracing::info!(applied = applied.len(), versions = ?applied, "migrations applied");
    if let Some(role) = &config.grant_to {
        let mut connection = pg_jetstream::db::connect(url, MIGRATION_PATIENCE).await?;
        pg_jetstream::db::grant_runtime(&mut connection, role).await?;
        tracing::info!(%role, "runtime role granted the tables' rows");
    }
    Ok(())
}

/// The database and broker connections of a started service.
#[derive(Clone)]
pub struct Infrastructure {
    /// The service's database.
    pub pool: PgPool,
    pub(crate) relay_pool: PgPool,
    /// JetStream.
    pub js: jetstream::Context,
    /// The NATS connection, for readiness.
    pub nats: async_nats::Client,
    /// The messaging runtime's metrics, once [`Infrastructure::messaging`]
    /// has made the runtime's builder; sampled by the probes.
    pub(crate) metrics: MessagingMetrics,
    /// The runtime's configuration, from the service's.
    pub(crate) messaging: pg_jetstream::Config,
    pub(crate) registry: Arc<std::sync::Mutex<Registry>>,
    pub(crate) verifier: shop_auth::Verifier,
    pub(crate) probes: Arc<probes::Probes>,
}

impl std::fmt::Debug for Infrastructure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Infrastructure")
            .field("messaging", &self.messaging)
            .finish_non_exhaustive()
    }
}

impl Infrastructure {
    /// Migrates the database (the messaging tables, then `migrations`), or
    /// only checks that it is migrated (`--migrations check`), builds the
    /// pools and connects to NATS. The messaging runtime comes next, from
    /// [`Infrastructure::messaging`].
    pub async fn start(
        config: &ServiceConfig,
        identity: &Identity,
        migrations: EmbeddedMigrations,
    ) -> anyhow::Result<Self> {
        let service = identity.name;
        // First: a service that could not check tokens must not start.
        let verifier = shop_auth::Verifier::from_config(&config.auth)
            .await
            .context("loading the keys that verify bearer tokens")?;
        let database_url = config.database_url.expose_secret();
        match config.migrations {
            Migrations::Apply => {
                pg_jetstream::db::migrate(database_url, vec![pg_jetstream::MIGRATIONS, migrations])
                    .await
                    .context("migrating the database")?;
            }
            Migrations::Check => {
                let pending = pg_jetstream::db::pending(
                    database_url,
                    vec![pg_jetstream::MIGRATIONS, migrations],
                )
                .await
                .context("checking the database's migrations")?;
                anyhow::ensure!(
                    pending.is_empty(),
                    "the database lacks {} migration(s) ({}): run the service with --migrate-only and the database owner's DATABASE_URL first",
                    pending.len(),
                    pending.join(", ")
                );
            }
        }
        // Every statement on the hot path finds its rows by key, so a plan
        // made once per connection serves every call; left to choose,
        // PostgreSQL plans the array-parameter statements afresh each time.
        // Sequential scans are off for the same reason: a connection keeps
        // the plan it made while a table was empty (a fresh stack), where a
        // scan looks cheapest, until autovacuum next analyzes the table; the
        // scan then reads every row on every call, which made one client's
        // sagas twice as slow right after a large benchmark. A statement
        // with no index to use still scans.
        // Some failures are told by the server's messages: English ones.
        let database_url = pg_jetstream::db::english_messages(database_url)
            .await
            .context("checking the language of the database's messages")?;
        let database_url = database_url.as_str();
        let limits = config.session_limits();
        let pool = pg_jetstream::db::pool_with_limits(
            &pg_jetstream::db::with_settings(
                database_url,
                &[
                    ("plan_cache_mode", "force_generic_plan"),
                    ("enable_seqscan", "off"),
                ],
            ),
            config.db_pool_size,
            &limits,
        )?;
        // The relay's own connections: busy consumers must never starve its
        // sweep, which publishes what they wait for when a writer could not.
        // Its commits only delete rows already in JetStream (or about to
        // be), so they need not wait for the disk: a delete lost in a crash
        // lets the sweep publish the row again, and JetStream (the row id is
        // the message id) or the consumers' inboxes drop the copy.
        let relay_pool = pg_jetstream::db::pool_with_limits(
            &pg_jetstream::db::with_setting(database_url, "synchronous_commit", "off"),
            2,
            &limits,
        )?;
        // Replies (JetStream API answers, pulled messages) come to an inbox
        // of the service's own, so that NATS can let each service subscribe
        // to its own replies only.
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("shop-{service}"))
            .custom_inbox_prefix(format!("_INBOX_{service}"))
            .retry_on_initial_connect()
            .max_reconnects(None)
            // A node that hangs (not one that dies: its socket closes) is
            // left after two unanswered pings: with the client's default
            // of a minute apart, a frozen node would stall the service
            // for two minutes; ten seconds apart, for about twenty, at
            // one ping and pong per ten seconds when idle.
            .ping_interval(NATS_PING_INTERVAL);
        if let Some(creds) = &config.nats_creds {
            options = options
                .credentials_file(creds)
                .await
                .context("reading the NATS credentials")?;
        }
        if let (Some(user), Some(password)) = (&config.nats_user, &config.nats_password) {
            options = options.user_and_password(user.clone(), password.expose_secret().to_owned());
        }
        let servers =
            pg_jetstream::provision::nats_servers(&config.nats_url).context("reading NATS_URL")?;
        let nats = options
            .connect(servers)
            .await
            .context("connecting to NATS")?;
        let js = jetstream::new(nats.clone());
        let mut messaging = pg_jetstream::Config::new(service);
        messaging.stream = identity.stream.to_owned();
        messaging.source = identity.source();
        messaging.ack_wait = Duration::from_millis(config.ack_wait_ms);
        messaging.concurrency = config.consumer_concurrency;
        messaging.stream_replicas = config.stream_replicas;
        messaging.stream_max_bytes = config.stream_max_bytes;
        // Else the operator makes them (`shopctl provision`), and a service
        // only warns when they are missing.
        messaging.provision_shared_streams = config.provision_shared_streams;
        messaging.provision_patience = PROVISION_PATIENCE;
        Ok(Self {
            pool,
            relay_pool,
            js,
            nats,
            metrics: MessagingMetrics::default(),
            messaging,
            registry: Arc::new(std::sync::Mutex::new(Registry::default())),
            verifier,
            probes: Arc::default(),
        })
    }

    /// The messaging runtime's builder for this service, as every service
    /// starts it: its stream, source and consumers' settings from the
    /// service's configuration, the relay on its own pool, and the
    /// runtime's metrics served on `/metrics` under `shop_`. Add the
    /// streams it consumes, then start it with the handlers' state and give
    /// it to [`Server::bind`](crate::Server::bind).
    pub fn messaging<S: Clone + Send + Sync + 'static>(&mut self) -> MessagingBuilder<S> {
        let builder =
            Messaging::builder(self.js.clone(), self.pool.clone(), self.messaging.clone())
                .relay_pool(self.relay_pool.clone());
        self.metrics = builder.metrics().clone();
        // The runtime's metrics, named like the shop's own:
        // shop_events_published, ...
        self.register_metrics(|registry| {
            builder
                .metrics()
                .register(registry.sub_registry_with_prefix("shop"));
        });
        builder
    }

    /// Registers a service's own metrics beside the runtime's, served on
    /// `/metrics`.
    pub fn register_metrics(&self, register: impl FnOnce(&mut Registry)) {
        let mut registry = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        register(&mut registry);
    }

    /// The metrics in Prometheus's text format.
    pub(crate) fn encode_metrics(&self) -> String {
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }
}

/// How often a service pings its NATS server; see where it connects.
const NATS_PING_INTERVAL: Duration = Duration::from_secs(10);

/// How long start-up keeps trying to provision its streams while JetStream
/// cannot serve the request yet (replicas started together on a cluster
/// still forming, a meta leader being elected); then the service exits with
/// the error. Within the chart's startup probe (two minutes).
const PROVISION_PATIENCE: Duration = Duration::from_secs(90);
