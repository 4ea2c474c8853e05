//! An OTLP trace collector inside a test: a tonic server of the OTLP trace
//! service that keeps every span with its service's name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

/// A span as the collector received it, with its service's name.
#[derive(Debug, Clone)]
pub struct Span {
    pub service: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    pub kind: i32,
    pub attributes: HashMap<String, String>,
}

#[derive(Default, Clone)]
pub struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

fn attributes(list: &[KeyValue]) -> HashMap<String, String> {
    list.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Span {
                        service: service.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        name: span.name.clone(),
                        kind: span.kind,
                        attributes: attributes(&span.attributes),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Collector {
    /// A collector serving the OTLP trace service on `port` of 127.0.0.1.
    pub fn start(
        port: u16,
    ) -> (
        Self,
        u16,
        tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    ) {
        let collector = Self::default();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve(([127, 0, 0, 1], port).into());
        (collector, port, tokio::spawn(server))
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    pub fn trace(&self, trace_id: &str) -> Vec<Span> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|span| span.trace_id == trace_id)
            .cloned()
            .collect()
    }

    /// Waits until the trace holds a consumer span of each (service,
    /// subject) and the parent of every consumer span in it, then returns
    /// the trace. Each service exports its spans in batches of its own, so
    /// a consumer's span can reach the collector before the span of the
    /// publish it continues.
    pub async fn wait_for(&self, trace_id: &str, consumed: &[(&str, &str)]) -> Vec<Span> {
        self.wait_until(trace_id, |spans| {
            let mut lacks: Vec<String> = consumed
                .iter()
                .filter(|(service, subject)| {
                    !spans.iter().any(|span| {
                        span.service == *service
                            && span.kind == SpanKind::Consumer as i32
                            && span.name == format!("{subject} process")
                    })
                })
                .map(|(service, subject)| format!("the span of {service} consuming {subject}"))
                .collect();
            lacks.extend(
                spans
                    .iter()
                    .filter(|span| {
                        span.kind == SpanKind::Consumer as i32
                            && !spans.iter().any(|p| p.span_id == span.parent_span_id)
                    })
                    .map(|span| format!("the parent of {} {}", span.service, span.name)),
            );
            lacks
        })
        .await
    }

    /// Waits until the trace holds a span `name` of `service`, then returns
    /// the trace.
    pub async fn wait_for_span(&self, trace_id: &str, service: &str, name: &str) -> Vec<Span> {
        self.wait_until(trace_id, |spans| {
            if spans.iter().any(|s| s.service == service && s.name == name) {
                Vec::new()
            } else {
                vec![format!("the span {name} of {service}")]
            }
        })
        .await
    }

    /// Waits until `lacking` finds nothing lacking in the trace (at most
    /// 30 s), then returns the trace.
    async fn wait_until(
        &self,
        trace_id: &str,
        lacking: impl Fn(&[Span]) -> Vec<String>,
    ) -> Vec<Span> {
        let started = Instant::now();
        loop {
            let spans = self.trace(trace_id);
            let lacks = lacking(&spans);
            if lacks.is_empty() {
                return spans;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "trace {trace_id} lacks {lacks:?}; it has {:#?}",
                spans
                    .iter()
                    .map(|s| format!("{} {}", s.service, s.name))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};

    /// Exports one span of `service`, as that service's batch would.
    async fn export(collector: &Collector, service: &str, span_id: u8, parent: u8, kind: SpanKind) {
        let name = match kind {
            SpanKind::Consumer => "order.placed process",
            _ => "order.placed publish",
        };
        let span = opentelemetry_proto::tonic::trace::v1::Span {
            trace_id: vec![7; 16],
            span_id: vec![span_id; 8],
            parent_span_id: vec![parent; 8],
            name: name.into(),
            kind: kind as i32,
            ..Default::default()
        };
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![KeyValue {
                        key: "service.name".into(),
                        value: Some(AnyValue {
                            value: Some(any_value::Value::StringValue(service.into())),
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![span],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        collector
            .export(tonic::Request::new(request))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_consumer_span_exported_before_its_producer_is_waited_for_with_it() {
        let collector = Collector::default();
        export(&collector, "inventory", 2, 1, SpanKind::Consumer).await;
        let late = collector.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            export(&late, "order", 1, 0, SpanKind::Producer).await;
        });
        let spans = collector
            .wait_for(&hex(&[7; 16]), &[("inventory", "order.placed")])
            .await;
        let names: Vec<_> = spans.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["order.placed process", "order.placed publish"]);
    }
}
