//! W3C trace context across process boundaries.
//!
//! The span that writes an outbox row stores its context in the row
//! ([`current`]); the relay sends it as `traceparent`/`tracestate` headers;
//! the consumer makes its processing span a child of it ([`continue_from`]).
//! gRPC servers and clients do the same with tonic metadata
//! ([`extract_from_metadata`], [`inject_into_metadata`]).
//!
//! Spans carry OpenTelemetry contexts only when the process installed a
//! `tracing-opentelemetry` layer; without one these helpers carry nothing
//! and cost next to nothing.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// A serialised W3C trace context.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceContext {
    /// `traceparent`, absent when there is no sampled-or-not span context.
    pub traceparent: Option<String>,
    /// `tracestate`, absent when empty.
    pub tracestate: Option<String>,
}

/// The context of the current `tracing` span.
pub fn current() -> TraceContext {
    let context = tracing::Span::current().context();
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    TraceContext {
        traceparent: carrier.remove("traceparent"),
        tracestate: carrier
            .remove("tracestate")
            .filter(|state| !state.is_empty()),
    }
}

/// The trace id of `span`, for log lines; empty when it has none (no
/// OpenTelemetry layer is installed).
pub fn trace_id(span: &tracing::Span) -> String {
    let context = span.context();
    let span_ref = context.span();
    let span_context = span_ref.span_context();
    if span_context.is_valid() {
        span_context.trace_id().to_string()
    } else {
        String::new()
    }
}

/// Makes `span` a child of the remote context, if there is one.
pub fn continue_from(span: &tracing::Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    let Some(traceparent) = traceparent else {
        return;
    };
    let mut carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    if let Some(tracestate) = tracestate {
        carrier.insert("tracestate".to_owned(), tracestate.to_owned());
    }
    let parent = TraceContextPropagator::new().extract(&carrier);
    // A parent that failed to parse is an empty context: the span then starts
    // its own trace, which is the best that can be done.
    let _ = span.set_parent(parent);
}

/// Makes `span` a child of the context in a gRPC request's metadata, so that
/// a client's `traceparent` is continued.
pub fn extract_from_metadata(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    let parent = TraceContextPropagator::new().extract(&MetadataExtractor(metadata));
    let _ = span.set_parent(parent);
}

/// Writes the current span's context into outgoing gRPC metadata.
pub fn inject_into_metadata(metadata: &mut tonic::metadata::MetadataMap) {
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut MetadataInjector(metadata));
}

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                tonic::metadata::KeyRef::Ascii(key) => Some(key.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// The span attribute that names the service a span belongs to, for a
/// process that runs several (a local stack exports each service's spans
/// under its own `service.name`).
pub const SERVICE_ATTRIBUTE: &str = "pg_jetstream.service";

/// The service of a CloudEvents source, its last path segment:
/// `travel/booking` is `booking`, `booking` is itself.
pub fn service_of(source: &str) -> &str {
    source.rsplit('/').next().unwrap_or(source)
}
