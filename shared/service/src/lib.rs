//! What every service binary shares, so that none writes it again.
//!
//! - [`ServiceConfig`]: the common flags and environment variables
//!   (`DATABASE_URL`, `NATS_URL`, `GRPC_ADDR`, `HTTP_ADDR`, the token
//!   verification of [`AuthConfig`], the [`TlsConfig`], ...); secrets are
//!   kept in `secrecy` types.
//! - [`migrate_only`]: the deployment's migration step, as the schema's
//!   owner, granting the runtime role the rows.
//! - [`Infrastructure`]: start-up of the token verifier, the database
//!   (migrations applied or checked, pool) and JetStream (the service's
//!   stream; `DLQ` and `REPLAY` made or checked), and the outbox.
//! - [`Server`]: the gRPC server (with reflection, `grpc.health.v1`, a span
//!   and metrics per request, and every other call authenticated by
//!   `shop_auth`'s layer; the handlers check the [`Caller`]), the HTTP
//!   server (`/healthz`, `/readyz`, `/metrics`), both over TLS when a
//!   certificate is given, and the background tasks (relay,
//!   consumers, sweepers), run until shutdown, on the service's default
//!   [`Ports`] unless configured otherwise; [`Running`] runs one on a task.
//! - [`shutdown_on_signal`] and [`Telemetry`] (logs, traces over OTLP) for
//!   `main`.
//! - [`ApiError`]: the one mapping from a use case's failure to a gRPC
//!   status, and the field parsers that produce it.

mod error;
mod lifecycle;
pub use shop_domain::limits;
mod observe;
mod probes;
mod telemetry;
mod tls;

pub use error::{ApiError, is_unique_violation, page_after, page_size, parse_uuid};
pub use lifecycle::{DRAIN, SHUTDOWN_WITHIN};
pub use observe::GrpcMetrics;
pub use probes::{HTTP_CONCURRENCY, READY_FRESH, Readiness, SAMPLE_EVERY};
pub use shop_auth::{AuthConfig, Caller, caller_of, roles};
pub use telemetry::Telemetry;
pub use tls::TlsConfig;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use diesel_migrations::EmbeddedMigrations;
use futures::future::BoxFuture;
use prometheus_client::registry::Registry;
use secrecy::{ExposeSecret as _, SecretString};
use shop_db::PgPool;
use shop_messaging::{
    ConsumerSpec, EventConsumer, MessagingMetrics, Outbox, Relay, RelayConfig, Router, StreamSpec,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Flags and environment variables every service takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceConfig {
    /// PostgreSQL URL of the service's own database (a secret: never shown
    /// in `--help` or logs).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_parser = secret)]
    pub database_url: SecretString,
    /// NATS server URL, or every node of a cluster, comma-separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// NATS credentials file (optional).
    #[arg(long, env = "NATS_CREDS")]
    pub nats_creds: Option<std::path::PathBuf>,
    /// NATS user, with `--nats-password` (optional).
    #[arg(long, env = "NATS_USER", requires = "nats_password")]
    pub nats_user: Option<String>,
    /// NATS password of `--nats-user`.
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true, value_parser = secret)]
    pub nats_password: Option<SecretString>,
    /// Address of the gRPC server [default: 0.0.0.0 and the service's port].
    #[arg(long, env = "GRPC_ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// Address of the HTTP server (`/healthz`, `/readyz`) [default: 0.0.0.0
    /// and the service's port].
    #[arg(long, env = "HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Most database connections.
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: usize,
    /// The longest a statement may run, in milliseconds.
    #[arg(long, env = "DB_STATEMENT_TIMEOUT_MS", default_value_t = 30_000)]
    pub db_statement_timeout_ms: u64,
    /// The longest a statement may wait for a row lock, in milliseconds;
    /// a consumer's batch that hits it is tried again in place, its
    /// messages kept.
    #[arg(long, env = "DB_LOCK_TIMEOUT_MS", default_value_t = 5_000)]
    pub db_lock_timeout_ms: u64,
    /// How long a session may sit idle inside a transaction before the
    /// database ends it, in milliseconds.
    #[arg(
        long,
        env = "DB_IDLE_IN_TRANSACTION_TIMEOUT_MS",
        default_value_t = 60_000
    )]
    pub db_idle_in_transaction_timeout_ms: u64,
    /// Replicas of the service's stream (1 on a single NATS server).
    #[arg(long, env = "STREAM_REPLICAS", default_value_t = 1)]
    pub stream_replicas: usize,
    /// The most bytes the service's stream holds; once full it refuses new
    /// events, which wait in the outbox (1 GiB by default; messages also
    /// leave after 7 days).
    #[arg(long, env = "STREAM_MAX_BYTES", default_value_t = shop_messaging::provision::STREAM_MAX_BYTES)]
    pub stream_max_bytes: i64,
    /// How long a delivered event may stay unacknowledged before JetStream
    /// hands it to another replica (its consumer died or hung), in
    /// milliseconds.
    #[arg(long, env = "ACK_WAIT_MS", default_value_t = 30_000)]
    pub ack_wait_ms: u64,
    /// Batches each event consumer handles at once, each in a transaction
    /// of its own (see `EventConsumer::with_concurrency`).
    #[arg(long, env = "CONSUMER_CONCURRENCY", default_value_t = 1)]
    pub consumer_concurrency: usize,
    /// Log format: `text` or `json`.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// At start-up, apply the schema's pending migrations (`apply`), or only
    /// check that none is pending (`check`), for a runtime role that may
    /// not change the schema.
    #[arg(long, env = "MIGRATIONS", default_value = "apply")]
    pub migrations: Migrations,
    /// Apply the migrations and exit: the deployment's step, run with the
    /// database owner's `DATABASE_URL`.
    #[arg(long)]
    pub migrate_only: bool,
    /// With `--migrate-only`: the runtime role that may then read and
    /// write the tables' rows, and nothing more.
    #[arg(long, env = "GRANT_TO", requires = "migrate_only")]
    pub grant_to: Option<String>,
    /// Create or update the shared `DLQ` and `REPLAY` streams at start-up.
    /// Off where NATS gives each service least privilege: the operator
    /// makes them (`shopctl provision`), and a service only checks.
    #[arg(
        long,
        env = "PROVISION_SHARED_STREAMS",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub provision_shared_streams: bool,
    /// Who may call: the identity provider's keys and what its tokens say.
    #[command(flatten)]
    pub auth: AuthConfig,
    /// TLS on the gRPC and HTTP ports.
    #[command(flatten)]
    pub tls: TlsConfig,
}

impl ServiceConfig {
    /// The bounds on every pooled database session's waits.
    pub fn session_limits(&self) -> shop_db::SessionLimits {
        shop_db::SessionLimits {
            statement_timeout: Duration::from_millis(self.db_statement_timeout_ms),
            lock_timeout: Duration::from_millis(self.db_lock_timeout_ms),
            idle_in_transaction_timeout: Duration::from_millis(
                self.db_idle_in_transaction_timeout_ms,
            ),
            ..shop_db::SessionLimits::default()
        }
    }

    /// A configuration for `database_url` and `nats_url` with both servers on
    /// free ports of 127.0.0.1, trusting the tokens `auth` describes, and
    /// the defaults otherwise: for tests and local runs.
    pub fn local(
        database_url: impl Into<String>,
        nats_url: impl Into<String>,
        auth: AuthConfig,
    ) -> Self {
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            database_url: SecretString::from(database_url.into()),
            nats_url: nats_url.into(),
            nats_creds: None,
            nats_user: None,
            nats_password: None,
            grpc_addr: Some(any_port),
            http_addr: Some(any_port),
            db_pool_size: 8,
            db_statement_timeout_ms: 30_000,
            db_lock_timeout_ms: 5_000,
            db_idle_in_transaction_timeout_ms: 60_000,
            stream_replicas: 1,
            stream_max_bytes: shop_messaging::provision::STREAM_MAX_BYTES,
            ack_wait_ms: 30_000,
            consumer_concurrency: 1,
            log_format: LogFormat::Text,
            migrations: Migrations::Apply,
            migrate_only: false,
            grant_to: None,
            provision_shared_streams: true,
            auth,
            tls: TlsConfig::default(),
        }
    }
}

/// A command-line or environment value kept as a secret.
fn secret(value: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(value))
}

/// What a service does about its schema at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Migrations {
    /// Apply the pending migrations (the role must own the schema).
    Apply,
    /// Refuse to start while any is pending; change nothing.
    Check,
}

/// The deployment's migration step: applies the messaging tables' and
/// `migrations` as the database's owner (`config.database_url`), then
/// grants `config.grant_to`, the runtime role, the rows and nothing more.
pub async fn migrate_only(
    config: &ServiceConfig,
    migrations: EmbeddedMigrations,
) -> anyhow::Result<()> {
    let url = config.database_url.expose_secret();
    let applied = shop_db::migrate(url, vec![shop_messaging::MIGRATIONS, migrations])
        .await
        .context("migrating the database")?;
    tracing::info!(applied = applied.len(), versions = ?applied, "migrations applied");
    if let Some(role) = &config.grant_to {
        shop_db::grant_runtime(url, role).await?;
        tracing::info!(%role, "runtime role granted the tables' rows");
    }
    Ok(())
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber of a process that runs several services
/// (a local stack, tests): logs filtered by `RUST_LOG` (default `info`),
/// spans with trace context, exported when `OTEL_EXPORTER_OTLP_ENDPOINT` is
/// set with each service's spans under its own `service.name` and the
/// rest under `process_name` ([`Telemetry::init_stack`]). A service's
/// `main` uses [`Telemetry::init`] instead, to name itself and flush at exit.
pub fn init_logs(process_name: &str, format: LogFormat) -> Option<Telemetry> {
    match Telemetry::init_stack(process_name, format) {
        Ok(telemetry) => Some(telemetry),
        Err(error) => {
            tracing::warn!(error = %error, "spans are not exported");
            None
        }
    }
}

/// A protobuf timestamp.
pub fn timestamp(at: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// A token cancelled on SIGTERM or SIGINT.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutdown requested");
        cancel.cancel();
    });
    token
}

/// The database and broker connections of a started service.
#[derive(Clone)]
pub struct Infrastructure {
    /// The service's database.
    pub pool: PgPool,
    relay_pool: PgPool,
    /// JetStream.
    pub js: jetstream::Context,
    /// The NATS connection, for readiness.
    pub nats: async_nats::Client,
    /// The service's outbox (`ce-source` = `shop/<service>`).
    pub outbox: Outbox,
    /// The relay's and consumers' metrics; give them to every consumer.
    pub metrics: MessagingMetrics,
    registry: Arc<std::sync::Mutex<Registry>>,
    verifier: shop_auth::Verifier,
    probes: Arc<probes::Probes>,
    ack_wait: Duration,
    consumer_concurrency: usize,
}

impl std::fmt::Debug for Infrastructure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Infrastructure")
            .field("outbox", &self.outbox)
            .finish_non_exhaustive()
    }
}

impl Infrastructure {
    /// Migrates the database (the messaging tables, then `migrations`), or
    /// only checks that it is migrated (`--migrations check`), builds the
    /// pool, connects to NATS and provisions `stream`, the
    /// dead-letter stream and the stream of replayed dead letters.
    pub async fn start(
        config: &ServiceConfig,
        service: &str,
        stream: StreamSpec,
        migrations: EmbeddedMigrations,
    ) -> anyhow::Result<Self> {
        // First: a service that could not check tokens must not start.
        let verifier = shop_auth::Verifier::from_config(&config.auth)
            .await
            .context("loading the keys that verify bearer tokens")?;
        let database_url = config.database_url.expose_secret();
        match config.migrations {
            Migrations::Apply => {
                shop_db::migrate(database_url, vec![shop_messaging::MIGRATIONS, migrations])
                    .await
                    .context("migrating the database")?;
            }
            Migrations::Check => {
                let pending =
                    shop_db::pending(database_url, vec![shop_messaging::MIGRATIONS, migrations])
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
        let database_url = shop_db::english_messages(database_url)
            .await
            .context("checking the language of the database's messages")?;
        let database_url = database_url.as_str();
        let limits = config.session_limits();
        let pool = shop_db::pool_with_limits(
            &shop_db::with_settings(
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
        let relay_pool = shop_db::pool_with_limits(
            &shop_db::with_setting(database_url, "synchronous_commit", "off"),
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
        let servers = shop_messaging::nats_servers(&config.nats_url).context("reading NATS_URL")?;
        let nats = options
            .connect(servers)
            .await
            .context("connecting to NATS")?;
        let js = jetstream::new(nats.clone());
        stream
            .with_replicas(config.stream_replicas)
            .with_max_bytes(config.stream_max_bytes)
            .provision_patiently(&js, PROVISION_PATIENCE)
            .await?;
        for shared in [StreamSpec::dead_letters(), StreamSpec::replays()] {
            if config.provision_shared_streams {
                shared
                    .with_replicas(config.stream_replicas)
                    .provision_patiently(&js, PROVISION_PATIENCE)
                    .await?;
            } else if let Err(error) = js.get_stream(&shared.name).await {
                // Not fatal: a dead letter waits (and is retried) until the
                // stream exists, and the replay consumer keeps trying.
                tracing::warn!(
                    stream = %shared.name,
                    %error,
                    "a shared stream is missing; the operator makes it with `shopctl provision`"
                );
            }
        }
        let metrics = MessagingMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let outbox = Outbox::new(format!("shop/{service}"))
            .publishing_to(js.clone())
            .with_metrics(metrics.clone());
        Ok(Self {
            pool,
            relay_pool,
            js,
            nats,
            outbox,
            metrics,
            registry: Arc::new(std::sync::Mutex::new(registry)),
            verifier,
            probes: Arc::default(),
            ack_wait: Duration::from_millis(config.ack_wait_ms),
            consumer_concurrency: config.consumer_concurrency,
        })
    }

    /// An idempotent consumer of this service's database and outbox, with
    /// the configured ack wait, counting into the service's metrics.
    pub fn consumer<S: Send + Sync + 'static>(
        &self,
        spec: ConsumerSpec,
        router: Router<S>,
        state: S,
    ) -> EventConsumer<S> {
        self.probes.add_consumer(&spec.durable_name, &spec.stream);
        EventConsumer::new(
            self.js.clone(),
            self.pool.clone(),
            self.outbox.clone(),
            ConsumerSpec {
                ack_wait: self.ack_wait,
                ..spec
            },
            router,
            state,
        )
        .with_concurrency(self.consumer_concurrency)
        .with_metrics(self.metrics.clone())
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
    fn encode_metrics(&self) -> String {
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }

    /// The outbox relay of this service's database.
    pub fn relay(&self) -> Relay {
        Relay::new(
            self.relay_pool.clone(),
            self.js.clone(),
            RelayConfig::default(),
        )
        .forgetting_for(&self.outbox)
        .with_metrics(self.metrics.clone())
    }
}

/// The `grpc.health.v1` service name that answers SERVING as long as the
/// process serves, for liveness probes; the server as a whole (`""`) and
/// each API answer SERVING only while PostgreSQL does (see
/// [`Readiness::serving`]).
pub const LIVENESS: &str = "liveness";

/// How often a service pings its NATS server; see where it connects.
const NATS_PING_INTERVAL: Duration = Duration::from_secs(10);

/// How long start-up keeps trying to provision its streams while JetStream
/// cannot serve the request yet (replicas started together on a cluster
/// still forming, a meta leader being elected); then the service exits with
/// the error. Within the chart's startup probe (two minutes).
const PROVISION_PATIENCE: Duration = Duration::from_secs(90);

/// A background task: `run(shutdown)`.
pub type Task = Box<dyn FnOnce(CancellationToken) -> BoxFuture<'static, ()> + Send>;

/// A service ready to run: its listeners are bound, so its addresses are known
/// (port 0 picks a free port).
pub struct Server {
    name: &'static str,
    grpc: TcpListener,
    http: TcpListener,
    routes: tonic::service::Routes,
    health: tonic_health::server::HealthReporter,
    infra: Infrastructure,
    tasks: Vec<Task>,
    services: Vec<&'static str>,
    tls: Option<tls::ServerTls>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A service's default ports: gRPC 50051 user, 50052 order, 50053
/// inventory, 50054 payment; HTTP 9101 to 9104 likewise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// The gRPC port.
    pub grpc: u16,
    /// The HTTP port.
    pub http: u16,
}

async fn listen(what: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen for {what} on {addr} (is another process using port {}?)",
            addr.port()
        )
    })
}

impl Server {
    /// Binds the listeners of `config` for service `name`, on its default
    /// ports unless the configuration names addresses.
    pub async fn bind(
        name: &'static str,
        ports: Ports,
        config: &ServiceConfig,
        infra: Infrastructure,
    ) -> anyhow::Result<Self> {
        let any = std::net::Ipv4Addr::UNSPECIFIED;
        let grpc = listen(
            "gRPC",
            config
                .grpc_addr
                .unwrap_or(SocketAddr::from((any, ports.grpc))),
        )
        .await?;
        let http = listen(
            "HTTP",
            config
                .http_addr
                .unwrap_or(SocketAddr::from((any, ports.http))),
        )
        .await?;
        let tls = config
            .tls
            .server_tls()
            .context("loading the TLS certificate")?;
        let (health, health_service) = tonic_health::server::health_reporter();
        let routes = tonic::service::Routes::new(health_service);
        Ok(Self {
            name,
            grpc,
            http,
            routes,
            health,
            infra,
            tasks: Vec::new(),
            services: Vec::new(),
            tls,
        })
    }

    /// Adds a gRPC service; `full_name` is what `grpc.health.v1` reports it as.
    #[must_use]
    pub fn add_service<S>(mut self, full_name: &'static str, service: S) -> Self
    where
        S: tower_service::Service<
                axum::http::Request<tonic::body::Body>,
                Response = axum::http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.routes = self.routes.add_service(service);
        self.services.push(full_name);
        self
    }

    /// Adds a background task, run until shutdown.
    #[must_use]
    pub fn add_task(mut self, task: Task) -> Self {
        self.tasks.push(task);
        self
    }

    /// The gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` is cancelled or a server ends on its own,
    /// then, in this order and within [`SHUTDOWN_WITHIN`]: stops taking
    /// requests and messages, lets the requests, batches and background
    /// tasks in hand finish, lets the relay publish what they committed,
    /// and returns (see `lifecycle`).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            name,
            grpc,
            http,
            routes,
            health,
            infra,
            tasks,
            services,
            tls,
        } = self;
        // Reflection names only what this server serves. Both versions:
        // grpcurl before 1.9 speaks only v1alpha.
        let reflection = || {
            let mut builder = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(shop_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name("grpc.health.v1.Health");
            for service in &services {
                builder = builder.with_service_name(*service);
            }
            builder
        };
        let routes = routes
            .add_service(
                reflection()
                    .build_v1()
                    .context("building gRPC reflection")?,
            )
            .add_service(
                reflection()
                    .build_v1alpha()
                    .context("building gRPC reflection")?,
            );
        let methods = observe::served_methods(&services);
        // The relay stops last: it publishes what the requests and the
        // consumers commit while they finish, so a stopped service leaves
        // nothing in its outbox for the next start.
        let relay_stop = CancellationToken::new();
        let relay = tokio::spawn(infra.relay().run(relay_stop.clone()));
        // Everything stops on `stop`: the caller's shutdown, or a server of
        // this service ending on its own (see `lifecycle`).
        let shutdown = shutdown.child_token();
        // Should this function return early (a bad TLS setting), nothing
        // it started keeps running.
        let _stop_guards = (
            shutdown.clone().drop_guard(),
            relay_stop.clone().drop_guard(),
        );
        let tracker = TaskTracker::new();
        let grpc_metrics = GrpcMetrics::default();
        infra.register_metrics(|registry| grpc_metrics.register(registry));
        for task in tasks {
            tracker.spawn(task(shutdown.clone()));
        }
        // NOT_SERVING until the first look at the dependencies, rather than
        // "unknown service" (or SERVING for the server as a whole).
        for service in services.iter().copied().chain([""]) {
            health
                .set_service_status(service, tonic_health::ServingStatus::NotServing)
                .await;
        }
        // For liveness probes: SERVING while the process serves at all,
        // whatever its dependencies do (restarting it would not bring them
        // back).
        health
            .set_service_status(LIVENESS, tonic_health::ServingStatus::Serving)
            .await;
        tracker.spawn(watch_health(
            health,
            services,
            infra.clone(),
            shutdown.clone(),
        ));
        tracker.close();

        let verifier = infra.verifier.clone();
        let app = probes::http_app(Arc::new(infra));
        let http_shutdown = shutdown.clone();
        let http = match &tls {
            Some(tls) => {
                let listener = tls::TlsListener::new(http, tls.http.clone(), shutdown.clone())?;
                tokio::spawn(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(http_shutdown.cancelled_owned())
                        .await
                })
            }
            None => tokio::spawn(async move {
                axum::serve(http, app)
                    .with_graceful_shutdown(http_shutdown.cancelled_owned())
                    .await
            }),
        };
        tracing::info!(service = name, grpc = %grpc.local_addr()?, tls = tls.is_some(), "serving");
        let incoming = tokio_stream_listener(grpc);
        // Observed first, so that refused calls are counted and traced too.
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &tls {
            builder = builder
                .tls_config(tls.grpc.clone())
                .context("configuring gRPC TLS")?;
        }
        let grpc = builder
            .layer(observe::ObserveLayer {
                metrics: grpc_metrics,
                service: name,
                methods: Arc::new(methods),
            })
            .layer(shop_auth::AuthLayer::new(verifier))
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
        let http = async move { Ok(http.await.context("the HTTP server task")??) };
        let grpc = async move { Ok(grpc.await?) };
        let relay = async move {
            if let Err(error) = relay.await {
                tracing::error!(service = name, %error, "the outbox relay task failed");
            }
        };
        // Boxed: the servers' futures are large.
        Box::pin(
            lifecycle::Running {
                stop: shutdown,
                grpc,
                http,
                tasks: tracker,
                relay_stop,
                relay,
            }
            .serve(name, SHUTDOWN_WITHIN),
        )
        .await?;
        tracing::info!(service = name, "stopped");
        Ok(())
    }
}

/// A server running on a task of its own; dropping the handle shuts it down.
#[derive(Debug)]
pub struct Running {
    grpc: SocketAddr,
    http: SocketAddr,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    /// Spawns `server.run` on the current runtime.
    pub fn spawn(server: Server) -> Self {
        Self::spawn_in(server, tracing::Span::none())
    }

    /// Spawns `server.run` inside `span`, so that its logs carry the span
    /// (a local stack prefixes each line with the service's name).
    pub fn spawn_in(server: Server, span: tracing::Span) -> Self {
        use tracing::Instrument as _;
        let (grpc, http) = (server.grpc_addr(), server.http_addr());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()).instrument(span));
        Self {
            grpc,
            http,
            shutdown,
            task: Some(task),
        }
    }

    /// The gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
    }

    /// The HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    /// A gRPC channel to the server.
    pub async fn channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        Ok(
            tonic::transport::Channel::from_shared(format!("http://{}", self.grpc))?
                .connect()
                .await?,
        )
    }

    /// Shuts the server down gracefully and returns how its run ended.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn tokio_stream_listener(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| {
            let _ = stream.set_nodelay(true);
            stream
        });
        Some((accepted, listener))
    })
}

/// How often the gRPC health status is brought up to date. Each look asks
/// the database a question, so an idle service should not look every
/// second; at 5 s Kubernetes' gRPC readiness probe (every 5 s in the chart)
/// still sees a lost database within two of its periods. `/readyz` shares
/// the check when it is under a second old.
const HEALTH_EVERY: Duration = Duration::from_secs(5);

/// Reports every gRPC service SERVING while the service can serve (the
/// database answers), NOT_SERVING otherwise, and logs each change of either
/// dependency.
async fn watch_health(
    health: tonic_health::server::HealthReporter,
    services: Vec<&'static str>,
    infra: Infrastructure,
    shutdown: CancellationToken,
) {
    let mut last: Option<Readiness> = None;
    loop {
        let now = infra.readiness().await;
        if last.map(Readiness::serving) != Some(now.serving()) {
            let status = if now.serving() {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            for service in services.iter().copied().chain([""]) {
                health.set_service_status(service, status).await;
            }
        }
        if let Some(last) = last
            && last != now
        {
            tracing::warn!(
                database = now.database,
                nats = now.nats,
                serving = now.serving(),
                "dependencies changed state"
            );
        }
        last = Some(now);
        tokio::select! {
            () = shutdown.cancelled() => {
                for service in services.iter().copied().chain([""]) {
                    health.set_service_status(service, tonic_health::ServingStatus::NotServing).await;
                }
                return;
            }
            () = tokio::time::sleep(HEALTH_EVERY) => {}
        }
    }
}
