//! Health, readiness and metrics: what the HTTP port answers (`/metrics`,
//! `/healthz`, `/readyz`) and what `grpc.health.v1` reports.
//!
//! Scrapes and probes come from outside, as often as anyone sends them
//! (two Prometheus replicas, a load balancer, a loop of `curl`), and none of
//! them may cost the saga anything it needs:
//! - the gauges that ask a dependency (the outbox backlog, the dead-letter
//!   stream, each consumer's pending count) are sampled at most once per
//!   [`SAMPLE_EVERY`], however many scrape at once: one scrape samples, the
//!   others wait for it or are answered with what it found;
//! - the backlog is counted on the service's main pool, never the relay's,
//!   whose two connections publish what the writers could not;
//! - `/readyz` answers from a check at most [`READY_FRESH`] old (the gRPC
//!   health service shares it);
//! - at most [`METRICS_CONCURRENCY`] scrapes and [`PROBE_CONCURRENCY`]
//!   probes are served at once, each kind with slots of its own (a flood of
//!   scrapes never fails the kubelet's probes); the ones beyond are
//!   answered 503 at once rather than queued.
//!
//! The gRPC health service (`grpc.health.v1`) is kept up to date here too,
//! every 5 s, from the same readiness check.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::IntoResponse as _;
use diesel_async::RunQueryDsl as _;
use pg_jetstream::telemetry::ConsumerLabels;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::Infrastructure;

/// How often, at most, the sampled gauges ask their dependencies.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// How old a readiness check `/readyz` may answer from.
pub const READY_FRESH: Duration = Duration::from_secs(1);

/// How many scrapes of `/metrics` are served at once.
pub const METRICS_CONCURRENCY: usize = 4;

/// How many requests to `/healthz` and `/readyz` are served at once.
pub const PROBE_CONCURRENCY: usize = 64;

/// What the probes last found, and the consumers whose backlog they count.
#[derive(Default)]
pub(crate) struct Probes {
    /// When the gauges were last sampled; held while sampling.
    sampled: Mutex<Option<Instant>>,
    /// The last readiness check; held while checking.
    ready: Mutex<Option<(Instant, Readiness)>>,
    /// (durable, stream) of every consumer the service made.
    consumers: std::sync::Mutex<Vec<(String, String)>>,
}

impl Probes {
    /// Counts `durable` on `stream` among the consumers whose pending
    /// messages are sampled.
    pub(crate) fn add_consumer(&self, durable: &str, stream: &str) {
        self.consumers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((durable.to_owned(), stream.to_owned()));
    }
}

impl Infrastructure {
    /// Brings the gauges up to date, asking the dependencies at most once
    /// per [`SAMPLE_EVERY`]. A dependency that does not answer within a
    /// second leaves its gauges as they were.
    async fn sample_gauges(&self) {
        let connected = self.nats.connection_state() == async_nats::connection::State::Connected;
        self.metrics.nats_connected.set(i64::from(connected));
        let mut sampled = self.probes.sampled.lock().await;
        if sampled.is_some_and(|at| at.elapsed() < SAMPLE_EVERY) {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            tokio::join!(
                self.sample_backlog(),
                self.sample_dead_letters(),
                self.sample_consumers()
            )
        })
        .await;
        *sampled = Some(Instant::now());
    }

    async fn sample_backlog(&self) {
        if let Err(error) = pg_jetstream::outbox::backlog(&self.pool, &self.metrics).await {
            tracing::debug!(error = %error, "cannot sample the outbox backlog");
        }
    }

    async fn sample_dead_letters(&self) {
        if let Ok(mut dlq) = self
            .js
            .get_stream(pg_jetstream::provision::DLQ_STREAM)
            .await
            && let Ok(info) = dlq.info().await
        {
            self.metrics
                .dead_letters_stored
                .set(i64::try_from(info.state.messages).unwrap_or(i64::MAX));
        }
    }

    async fn sample_consumers(&self) {
        let consumers = self
            .probes
            .consumers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for (durable, stream) in consumers {
            let consumer = self
                .js
                .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
                    &durable, &stream,
                )
                .await;
            // A durable that is gone is the consumer's to make again (and
            // shop_consumer_up's to show); its count stays as it was.
            if let Ok(consumer) = consumer {
                let info = consumer.cached_info();
                let pending = info.num_pending.saturating_add(info.num_ack_pending as u64);
                self.metrics
                    .consumer_pending
                    .get_or_create(&ConsumerLabels { consumer: durable })
                    .set(i64::try_from(pending).unwrap_or(i64::MAX));
            }
        }
    }

    /// What the service's dependencies look like, from a check at most
    /// [`READY_FRESH`] old.
    pub async fn readiness(&self) -> Readiness {
        let mut last = self.probes.ready.lock().await;
        if let Some((at, readiness)) = *last
            && at.elapsed() < READY_FRESH
        {
            return readiness;
        }
        let readiness = self.check_readiness().await;
        *last = Some((Instant::now(), readiness));
        readiness
    }

    async fn check_readiness(&self) -> Readiness {
        let nats = self.nats.connection_state() == async_nats::connection::State::Connected;
        let database = async {
            let mut conn = self.pool.get().await.ok()?;
            diesel::sql_query("SELECT 1").execute(&mut conn).await.ok()
        };
        let database = tokio::time::timeout(Duration::from_secs(2), database)
            .await
            .ok()
            .flatten()
            .is_some();
        self.metrics.nats_connected.set(i64::from(nats));
        Readiness { database, nats }
    }
}

/// The state of a service's dependencies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// PostgreSQL answered a query within 2 s.
    pub database: bool,
    /// The NATS connection is up.
    pub nats: bool,
}

impl Readiness {
    /// Whether the service can serve its RPCs: they need PostgreSQL only.
    /// Without NATS, what they commit waits in the outbox and the
    /// consumers wait for the broker, so a NATS outage does not take the
    /// service out of its load balancer.
    pub fn serving(self) -> bool {
        self.database
    }

    /// One line for `/readyz`.
    fn describe(self) -> &'static str {
        match (self.database, self.nats) {
            (true, true) => "ready: database up, NATS connected",
            (true, false) => "ready: database up, NATS disconnected (events wait in the outbox)",
            (false, true) => "not ready: database unreachable, NATS connected",
            (false, false) => "not ready: database unreachable, NATS disconnected",
        }
    }
}

/// The HTTP port's routes: at most [`METRICS_CONCURRENCY`] scrapes and
/// [`PROBE_CONCURRENCY`] probes at once, each kind with slots of its own,
/// so that a flood of scrapes never makes the kubelet's probes fail.
pub(crate) fn http_app(infra: Arc<Infrastructure>) -> axum::Router {
    let scraped = Arc::clone(&infra);
    let metrics = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let infra = Arc::clone(&scraped);
                async move {
                    infra.sample_gauges().await;
                    let text = infra.encode_metrics();
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::new(tokio::sync::Semaphore::new(METRICS_CONCURRENCY)),
            at_most,
        ));
    let probes = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let infra = Arc::clone(&infra);
                async move {
                    let readiness = infra.readiness().await;
                    let status = if readiness.serving() {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    (status, readiness.describe())
                }
            }),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::new(tokio::sync::Semaphore::new(PROBE_CONCURRENCY)),
            at_most,
        ));
    metrics.merge(probes)
}

/// Serves the request if one of `slots` is free, else answers `503` with
/// `Retry-After` at once rather than queueing it.
async fn at_most(
    axum::extract::State(slots): axum::extract::State<Arc<tokio::sync::Semaphore>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match slots.try_acquire() {
        Ok(_slot) => next.run(request).await,
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(axum::http::header::RETRY_AFTER, "1")],
            "busy: too many HTTP requests at once",
        )
            .into_response(),
    }
}

/// The `grpc.health.v1` service name that answers SERVING as long as the
/// process serves, for liveness probes; the server as a whole (`""`) and
/// each API answer SERVING only while PostgreSQL does (see
/// [`Readiness::serving`]).
pub const LIVENESS: &str = "liveness";

/// Reports every gRPC service NOT_SERVING until the first look at the
/// dependencies (rather than "unknown service", or SERVING for the server
/// as a whole), and [`LIVENESS`] SERVING while the process serves at all,
/// whatever its dependencies do (restarting it would not bring them back).
pub(crate) async fn report_starting(
    health: &tonic_health::server::HealthReporter,
    services: &[&'static str],
) {
    for service in services.iter().copied().chain([""]) {
        health
            .set_service_status(service, tonic_health::ServingStatus::NotServing)
            .await;
    }
    health
        .set_service_status(LIVENESS, tonic_health::ServingStatus::Serving)
        .await;
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
pub(crate) async fn watch_health(
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
