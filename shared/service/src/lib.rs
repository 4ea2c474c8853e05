//! What every service binary shares, so that none writes it again. One
//! concern per module:
//!
//! - `config`: [`ServiceConfig`], the common flags and environment
//!   variables (`DATABASE_URL`, `NATS_URL`, `GRPC_ADDR`, `HTTP_ADDR`, the
//!   token verification of [`AuthConfig`], the [`TlsConfig`], ...); secrets
//!   are kept in `secrecy` types.
//! - `identity`: [`Identity`], a service's name, stream and ports, written
//!   once per service.
//! - `infra`: [`Infrastructure`], start-up of the token verifier, the
//!   database (migrations applied or checked, pools) and JetStream (the
//!   service's stream; `DLQ` and `REPLAY` made or checked), and the outbox;
//!   [`migrate_only`], the deployment's migration step.
//! - `server`: [`Server`], the gRPC server (with reflection,
//!   `grpc.health.v1`, a span and metrics per request, and every other call
//!   authenticated by `shop_auth`'s layer; the handlers check the
//!   [`Caller`]), the HTTP server and the background tasks (relay,
//!   consumers, sweepers), on the service's default [`Ports`] unless
//!   configured otherwise, both servers over TLS (`tls`) when a certificate
//!   is given.
//! - `probes`: `/metrics`, `/healthz`, `/readyz` and the gRPC health
//!   status, none of which may cost the saga anything.
//! - `lifecycle`: the one order a service stops in, within
//!   [`SHUTDOWN_WITHIN`].
//! - `observe`, `telemetry`: request metrics and spans; logs and traces
//!   over OTLP ([`Telemetry`]).
//! - `error`: [`ApiError`], the one mapping from a use case's failure to a
//!   gRPC status, and the field parsers that produce it.
//! - `running` (feature `local`): `Running`, a server on a task of its
//!   own, for tests and `shopctl up`.
//! - here: [`shutdown_on_signal`], [`init_logs`] and [`timestamp`].

mod config;
mod error;
mod identity;
mod infra;
mod lifecycle;
mod observe;
mod probes;
#[cfg(feature = "local")]
mod running;
mod server;
mod telemetry;
mod tls;

pub use config::{LogFormat, Migrations, ServiceConfig};
pub use error::{
    ApiError, is_unique_violation, page_after, page_size, parse_uuid, step_failed, unknown_stored,
};
pub use identity::Identity;
pub use infra::{Infrastructure, migrate_only};
pub use lifecycle::{DRAIN, SHUTDOWN_WITHIN};
pub use observe::GrpcMetrics;
pub use probes::{
    LIVENESS, METRICS_CONCURRENCY, PROBE_CONCURRENCY, READY_FRESH, Readiness, SAMPLE_EVERY,
};
#[cfg(feature = "local")]
pub use running::Running;
pub use server::{Listeners, Ports, Server, Task};
pub use shop_auth::{AuthConfig, Caller, caller_of, roles};
pub use shop_domain::limits;
pub use telemetry::Telemetry;
pub use tls::TlsConfig;

use tokio_util::sync::CancellationToken;

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
