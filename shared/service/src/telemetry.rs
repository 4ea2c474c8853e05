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
use opentelemetry_sdk::trace::SdkTracerProvider;
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
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(service_name.to_owned());
        }
        let mut provider = SdkTracerProvider::builder().with_resource(resource.build());
        let exporting = export_requested();
        if exporting {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .context("building the OTLP span exporter")?;
            provider = provider.with_batch_exporter(exporter);
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
