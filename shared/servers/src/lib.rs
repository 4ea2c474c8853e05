//! `nats-server -js` and PostgreSQL as processes on this machine, each
//! stopped when its handle is dropped (and, through the parent-death
//! signal, when the process that started it dies):
//!
//! - [`Nats`]: one JetStream server; [`Nats::start`] on a free port with a
//!   temporary store (tests), [`Nats::start_in`] on a fixed port with a
//!   kept store (`shopctl up`); [`Nats::kill`], [`Nats::stop`],
//!   [`Nats::pause`] and [`Nats::start_again`] keep the port and the store,
//!   for fault tests.
//! - [`NatsCluster`]: three (or N) JetStream servers routed to each other,
//!   for replicated streams; each node killed, paused or restarted on its
//!   own.
//! - [`Postgres`]: one cluster (`initdb`), throwaway with fsync off
//!   ([`Postgres::start`]) or kept and durable ([`Postgres::start_in`]);
//!   [`Postgres::create_database`] hands out fresh, empty databases.
//!
//! - [`claim_port`]: waits for a fixed port that a closing connection holds
//!   (ports from 32768 up are clients' local ends too), refuses one that
//!   something listens on; the kept servers' starts use it.
//!
//! Binaries are found through `NATS_SERVER_BIN` / `PG_BIN_DIR`, on `PATH`, or
//! under `/usr/lib/postgresql/*/bin`; when one is missing, starting fails with
//! one line that says how to install it. PostgreSQL refuses to run as root, so
//! when started by root the cluster runs as the `postgres` user. Each server
//! runs in a process group of its own, so a terminal's Ctrl-C reaches only
//! whoever started it, which stops it in its own time.

mod binaries;
mod nats;
mod ports;
mod postgres;
mod process;

pub use nats::{Nats, NatsCluster};
pub use ports::{PORT_PATIENCE, PortError, claim_port};
pub use postgres::Postgres;

/// Why a server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A binary is missing; the message says how to install it.
    #[error("{0}")]
    Missing(String),
    /// The server did not start or did not become ready.
    #[error("{what} did not start: {detail}")]
    Start {
        /// Which server.
        what: &'static str,
        /// What went wrong, with the tail of the server's log.
        detail: String,
    },
    /// Preparing a directory or spawning a process failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A statement against the cluster failed.
    #[error("{context}: {detail}")]
    Database {
        /// What was being done.
        context: String,
        /// The database's error.
        detail: String,
    },
}
