//! Logs and traces: one `tracing` subscriber that writes log lines (text or
//! JSON) and turns spans into OpenTelemetry spans, exported over OTLP/gRPC
//! when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set. The exporter reads the other standard variables itself
//! (`OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_EXPORTER_OTLP_HEADERS`, ...); the
//! resource honours `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`, and
//! the sampler `OTEL_TRACES_SAMPLER`.
//!
//! Spans get OpenTelemetry contexts even when nothing is exported, so that
//! trace context still flows through events and every saga's log lines
//! carry its trace id.

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::LogFormat;

/// The installed subscriber's span pipeline; [`Telemetry::shutdown`] flushes
/// the spans still buffered.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
    exporting: bool,
}

/// Whether the environment asks for OTLP export.
fn export_requested() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var(name).is_ok_and(|value| !value.is_empty()))
}

impl Telemetry {
    /// Installs the global subscriber for `service_name` (the resource's
    /// `service.name` unless `OTEL_SERVICE_NAME` says otherwise): log lines
    /// filtered by `RUST_LOG` (default `info`) in `format`, and spans.
    /// Must run inside a Tokio runtime when exporting. A second call in the
    /// same process keeps the first subscriber.
    pub fn init(service_name: &str, format: LogFormat) -> anyhow::Result<Self> {
        Self::init_with_writer(service_name, format, std::io::stdout)
    }

    /// [`Telemetry::init`], with log lines written to `writer`.
    pub fn init_with_writer<W>(
        service_name: &str,
        format: LogFormat,
        writer: W,
    ) -> anyhow::Result<Self>
    where
        W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
    {
        let exporter = if export_requested() {
            Some(Exporter::Single(otlp(None)?))
        } else {
            None
        };
        Self::install(service_name, format, writer, exporter)
    }

    /// For a process that runs several services (a local stack): like
    /// [`Telemetry::init`] for `process_name`, but a span that names its
    /// service in [`pg_jetstream::telemetry::SERVICE_ATTRIBUTE`] (the gRPC,
    /// outbox, publish and consumer spans do) is exported under that service's `service.name`, as the
    /// service's own binary would export it; the rest under `process_name`.
    pub fn init_stack(process_name: &str, format: LogFormat) -> anyhow::Result<Self> {
        let exporter = if export_requested() {
            Some(Exporter::ByService(ByService::new(None)?))
        } else {
            None
        };
        Self::install(process_name, format, std::io::stdout, exporter)
    }

    /// [`Telemetry::init_stack`], exporting to the OTLP/gRPC `endpoint`
    /// whatever the environment says.
    pub fn init_stack_exporting_to(
        process_name: &str,
        format: LogFormat,
        endpoint: &str,
    ) -> anyhow::Result<Self> {
        let exporter = Exporter::ByService(ByService::new(Some(endpoint))?);
        Self::install(process_name, format, std::io::stdout, Some(exporter))
    }

    fn install<W>(
        service_name: &str,
        format: LogFormat,
        writer: W,
        exporter: Option<Exporter>,
    ) -> anyhow::Result<Self>
    where
        W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
    {
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(service_name.to_owned());
        }
        let mut provider = SdkTracerProvider::builder().with_resource(resource.build());
        let exporting = exporter.is_some();
        match exporter {
            Some(Exporter::Single(exporter)) => provider = provider.with_batch_exporter(exporter),
            Some(Exporter::ByService(exporter)) => {
                provider = provider.with_batch_exporter(exporter);
            }
            None => {}
        }
        let provider = provider.build();
        let spans = tracing_opentelemetry::layer().with_tracer(provider.tracer("shop"));
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let registry = tracing_subscriber::registry().with(filter).with(spans);
        let _ = match format {
            LogFormat::Text => registry
                .with(tracing_subscriber::fmt::layer().with_writer(writer))
                .try_init(),
            LogFormat::Json => registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(writer)
                        .json()
                        .flatten_event(true)
                        .with_current_span(false)
                        .with_span_list(true),
                )
                .try_init(),
        };
        Ok(Self {
            provider,
            exporting,
        })
    }

    /// Flushes the spans still buffered and stops exporting.
    pub async fn shutdown(self) {
        if !self.exporting {
            return;
        }
        let provider = self.provider;
        // The flush blocks until the exporter has answered.
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(error)) = flushed {
            tracing::warn!(%error, "cannot flush the last spans");
        }
    }
}

/// What the spans are exported with.
enum Exporter {
    /// One exporter: one `service.name`.
    Single(opentelemetry_otlp::SpanExporter),
    /// One exporter per service of a local stack.
    ByService(ByService),
}

/// An OTLP/gRPC span exporter, to `endpoint` or where the environment says.
fn otlp(endpoint: Option<&str>) -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
    use opentelemetry_otlp::WithExportConfig as _;
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if let Some(endpoint) = endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    builder.build().context("building the OTLP span exporter")
}

/// The services a local stack runs in one process.
const STACK_SERVICES: [&str; 4] = ["user", "order", "inventory", "payment"];

/// Exports each span with the resource of the service its
/// [`pg_jetstream::telemetry::SERVICE_ATTRIBUTE`] attribute names: one OTLP exporter per service, each with that service's
/// `service.name` on the process's resource, and one for the process's own
/// spans.
#[derive(Debug)]
struct ByService {
    process: opentelemetry_otlp::SpanExporter,
    services: Vec<(&'static str, opentelemetry_otlp::SpanExporter)>,
}

impl ByService {
    fn new(endpoint: Option<&str>) -> anyhow::Result<Self> {
        Ok(Self {
            process: otlp(endpoint)?,
            services: STACK_SERVICES
                .iter()
                .map(|name| Ok((*name, otlp(endpoint)?)))
                .collect::<anyhow::Result<_>>()?,
        })
    }

    /// Which exporter takes `span`: 0 for the process, `i + 1` for service
    /// `i`.
    fn route(&self, span: &SpanData) -> usize {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == pg_jetstream::telemetry::SERVICE_ATTRIBUTE)
            .and_then(|kv| {
                let name = kv.value.as_str();
                self.services
                    .iter()
                    .position(|(service, _)| *service == name)
            })
            .map_or(0, |index| index + 1)
    }
}

impl SpanExporter for ByService {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut parts: Vec<Vec<SpanData>> = vec![Vec::new(); self.services.len() + 1];
        for span in batch {
            let index = self.route(&span);
            parts[index].push(span);
        }
        let mut result = Ok(());
        for (index, part) in parts.into_iter().enumerate() {
            if part.is_empty() {
                continue;
            }
            let exporter = match index {
                0 => &self.process,
                i => &self.services[i - 1].1,
            };
            if let Err(error) = exporter.export(part).await {
                result = Err(error);
            }
        }
        result
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.process.set_resource(resource);
        for (name, exporter) in &mut self.services {
            let own =
                Resource::builder_empty()
                    .with_attributes(resource.iter().map(|(key, value)| {
                        opentelemetry::KeyValue::new(key.clone(), value.clone())
                    }))
                    .with_service_name(*name)
                    .build();
            exporter.set_resource(&own);
        }
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        let mut result = self.process.shutdown_with_timeout(timeout);
        for (_, exporter) in &self.services {
            if let Err(error) = exporter.shutdown_with_timeout(timeout) {
                result = Err(error);
            }
        }
        result
    }
}
