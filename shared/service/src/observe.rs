//! What every gRPC request leaves behind: a server span that continues the
//! caller's `traceparent`, and Prometheus counts and latencies by method and
//! status code.

use std::collections::HashSet;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::http;
use futures::future::BoxFuture;
use pg_jetstream::telemetry;
use pg_jetstream::telemetry::seconds_histogram;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tracing::Instrument as _;

/// Labels of a finished request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// `package.Service/Method`.
    method: String,
    /// The gRPC status code's name, e.g. `Ok`, `InvalidArgument`.
    code: String,
}

/// Labels of a request's duration.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

/// gRPC requests by method and code, and their latency.
#[derive(Debug, Clone)]
pub struct GrpcMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<MethodLabels, Histogram>,
}

impl Default for GrpcMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(seconds_histogram),
        }
    }
}

impl GrpcMetrics {
    /// Registers the metrics in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "shop_grpc_requests",
            "gRPC requests served, by method and status code",
            self.requests.clone(),
        );
        registry.register_with_unit(
            "shop_grpc_request_duration",
            "Time to answer a gRPC request",
            Unit::Seconds,
            self.duration.clone(),
        );
    }
}

/// The tower layer that observes every request of a tonic server.
#[derive(Debug, Clone)]
pub(crate) struct ObserveLayer {
    pub(crate) metrics: GrpcMetrics,
    /// The serving service, e.g. `order`.
    pub(crate) service: &'static str,
    /// The methods this server serves (`package.Service/Method`): only
    /// these become label values, so that made-up paths cannot grow the
    /// metrics without bound.
    pub(crate) methods: Arc<HashSet<String>>,
}

impl<S> tower_layer::Layer<S> for ObserveLayer {
    type Service = Observed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observed {
            inner,
            metrics: self.metrics.clone(),
            service: self.service,
            methods: Arc::clone(&self.methods),
        }
    }
}

/// A gRPC service, observed.
#[derive(Debug, Clone)]
pub(crate) struct Observed<S> {
    inner: S,
    metrics: GrpcMetrics,
    service: &'static str,
    methods: Arc<HashSet<String>>,
}

/// The label of every method this server does not serve.
const UNKNOWN_METHOD: &str = "unknown";

/// The methods of `services` (full names) in the descriptor sets, as
/// `package.Service/Method`, with health checks and reflection.
pub(crate) fn served_methods(services: &[&str]) -> HashSet<String> {
    use prost::Message as _;
    let mut methods: HashSet<String> = [
        "grpc.health.v1.Health/Check",
        "grpc.health.v1.Health/Watch",
        "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    let Ok(set) = prost_types::FileDescriptorSet::decode(shop_proto::FILE_DESCRIPTOR_SET) else {
        return methods;
    };
    for file in set.file {
        for service in &file.service {
            let full = format!("{}.{}", file.package(), service.name());
            if services.contains(&full.as_str()) {
                methods.extend(
                    service
                        .method
                        .iter()
                        .map(|method| format!("{full}/{}", method.name())),
                );
            }
        }
    }
    methods
}

/// Health checks and reflection are counted but get no span: probes would
/// drown the traces people look for.
fn traced(method: &str) -> bool {
    !method.starts_with("grpc.health.") && !method.starts_with("grpc.reflection.")
}

impl<S, B, R> tower_service::Service<http::Request<B>> for Observed<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>> + Send,
    S::Future: Send + 'static,
    S::Error: 'static,
    R: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().trim_start_matches('/').to_owned();
        let span = if traced(&method) {
            let (service, rpc) = method.split_once('/').unwrap_or((&method, ""));
            let span = tracing::info_span!(
                "grpc",
                otel.name = %method,
                otel.kind = "server",
                pg_jetstream.service = self.service,
                rpc.system = "grpc",
                rpc.service = %service,
                rpc.method = %rpc,
                rpc.grpc.status_code = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
                order_id = tracing::field::Empty,
                trace_id = tracing::field::Empty,
            );
            let metadata = tonic::metadata::MetadataMap::from_headers(request.headers().clone());
            telemetry::extract_from_metadata(&span, &metadata);
            span.record("trace_id", telemetry::trace_id(&span));
            span
        } else {
            tracing::Span::none()
        };
        let started = Instant::now();
        let response = self.inner.call(request).instrument(span.clone());
        let metrics = self.metrics.clone();
        let method = if self.methods.contains(&method) {
            method
        } else {
            UNKNOWN_METHOD.to_owned()
        };
        Box::pin(async move {
            let response = response.await;
            // A failed unary call is a trailers-only response: its status is
            // in the headers. A successful one carries it in the trailers.
            let code = match &response {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from_i32),
                Err(_) => tonic::Code::Unknown,
            };
            span.record("rpc.grpc.status_code", code as i32);
            if !matches!(
                code,
                tonic::Code::Ok
                    | tonic::Code::InvalidArgument
                    | tonic::Code::NotFound
                    | tonic::Code::AlreadyExists
                    | tonic::Code::FailedPrecondition
            ) {
                span.record("otel.status_code", "ERROR");
            }
            metrics
                .duration
                .get_or_create(&MethodLabels {
                    method: method.clone(),
                })
                .observe(started.elapsed().as_secs_f64());
            metrics
                .requests
                .get_or_create(&RequestLabels {
                    method,
                    code: format!("{code:?}"),
                })
                .inc();
            response
        })
    }
}
