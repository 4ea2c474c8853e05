//! The flags and environment variables every service takes.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::SecretString;

use crate::{AuthConfig, Listeners, TlsConfig};

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
    #[arg(long, env = "STREAM_MAX_BYTES", default_value_t = pg_jetstream::provision::STREAM_MAX_BYTES)]
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
    /// Listeners bound before the service was built, taken instead of
    /// binding `grpc_addr` and `http_addr`; not a flag. `shopctl up` binds
    /// every port of its stack before it starts anything, so that none of
    /// the connections it makes meanwhile is given one as its local end.
    #[arg(skip)]
    pub listeners: Listeners,
}

impl ServiceConfig {
    /// The bounds on every pooled database session's waits.
    pub fn session_limits(&self) -> pg_jetstream::db::SessionLimits {
        pg_jetstream::db::SessionLimits {
            statement_timeout: Duration::from_millis(self.db_statement_timeout_ms),
            lock_timeout: Duration::from_millis(self.db_lock_timeout_ms),
            idle_in_transaction_timeout: Duration::from_millis(
                self.db_idle_in_transaction_timeout_ms,
            ),
            ..pg_jetstream::db::SessionLimits::default()
        }
    }

    /// A configuration for `database_url` and `nats_url` with both servers on
    /// free ports of 127.0.0.1, trusting the tokens `auth` describes, and
    /// the defaults otherwise: for tests and local runs.
    #[cfg(feature = "local")]
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
            stream_max_bytes: pg_jetstream::provision::STREAM_MAX_BYTES,
            ack_wait_ms: 30_000,
            consumer_concurrency: 1,
            log_format: LogFormat::Text,
            migrations: Migrations::Apply,
            migrate_only: false,
            grant_to: None,
            provision_shared_streams: true,
            auth,
            tls: TlsConfig::default(),
            listeners: Listeners::default(),
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

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}
