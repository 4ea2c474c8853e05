//! Trace context from the span that writes an event, through the outbox row,
//! the relay's publish and the message headers, into the consumer's span.
//! Its own test binary: it installs a global OpenTelemetry subscriber.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::events::OrderPlaced;
use opentelemetry::trace::{TraceContextExt as _, TraceId, TracerProvider as _};
use pg_jetstream::{
    Context, Handler, HandlerError, Route, Router,
    consumer::EventConsumer,
    outbox::{Relay, RelayConfig},
    provision::ConsumerSpec,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

use crate::common::*;

#[derive(Default)]
struct Seen {
    trace_ids: Mutex<Vec<TraceId>>,
    traceparents: Mutex<Vec<String>>,
}

/// Remembers the trace each event is handled in.
impl Handler<OrderPlaced> for Seen {
    async fn handle(&self, cx: &mut Context<'_>, _event: OrderPlaced) -> Result<(), HandlerError> {
        let seen = self;
        let trace_id = tracing::Span::current()
            .context()
            .span()
            .span_context()
            .trace_id();
        seen.trace_ids.lock().unwrap().push(trace_id);
        seen.traceparents
            .lock()
            .unwrap()
            .push(cx.envelope().traceparent.clone().unwrap_or_default());
        Ok(())
    }
}

fn span_id(traceparent: &str) -> &str {
    traceparent.split('-').nth(2).unwrap_or_default()
}

/// Installs the OpenTelemetry subscriber, once for the test binary.
fn install_tracing() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::set_global_default(subscriber).unwrap();
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn the_consumer_continues_the_trace_of_the_span_that_wrote_the_event() {
    install_tracing();
    let setup = setup().await;
    let root = tracing::info_span!("place_order");
    let writer_trace = root.context().span().span_context().trace_id();
    let writer_span = root.context().span().span_context().span_id().to_string();
    assert_ne!(writer_trace, TraceId::INVALID);
    append(&setup, &[placed("o-1")]).instrument(root).await;
    let row_traceparent = outbox_traceparent(&setup.url).await;
    assert!(
        row_traceparent.contains(&writer_trace.to_string()),
        "the outbox row keeps the writer's context"
    );

    let relay = Relay::new(
        setup.pool.clone(),
        setup.js.clone(),
        RelayConfig {
            sweep_after: Duration::ZERO,
            ..RelayConfig::default()
        },
    );
    relay.sweep_once().await.unwrap();

    let seen = Arc::new(Seen::default());
    let consumer = EventConsumer::new(
        setup.js.clone(),
        setup.pool.clone(),
        setup.outbox.clone(),
        ConsumerSpec::new("inventory", "ORDER", &[]),
        Router::new().on::<OrderPlaced>(Route::single()),
        Arc::clone(&seen),
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    eventually("the event", Duration::from_secs(20), || async {
        !seen.trace_ids.lock().unwrap().is_empty()
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();

    assert_eq!(
        seen.trace_ids.lock().unwrap()[0],
        writer_trace,
        "one trace from writer to consumer"
    );
    let header = seen.traceparents.lock().unwrap()[0].clone();
    assert!(header.contains(&writer_trace.to_string()), "{header}");
    // The header names the relay's publish span, itself a child of the writer.
    assert_ne!(span_id(&header), writer_span, "{header}");
}

/// Events handled together by a batch route emit events that each continue
/// the trace of their own cause.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_route_emits_each_event_in_the_trace_of_its_cause() {
    install_tracing();
    let setup = setup().await;
    let behaviour = Arc::new(Behaviour::default());
    let consumer = consumer_with(
        &setup,
        ConsumerSpec::new("inventory", "ORDER", &["order.placed"]),
        Router::new().on::<OrderPlaced>(Route::batched()),
        Arc::clone(&behaviour),
    )
    .with_concurrency(1);
    let shutdown = CancellationToken::new();
    let mut writer_traces = Vec::new();
    // Arrived together: one batch, one call.
    let (task, _) = delivered_together(
        &setup,
        &behaviour,
        "gate",
        || tokio::spawn(consumer.run(shutdown.clone())),
        async || {
            let mut ids = Vec::new();
            for order in ["b-1", "b-2", "b-3"] {
                let root = tracing::info_span!("place_order");
                writer_traces.push(root.context().span().span_context().trace_id().to_string());
                ids.extend(append(&setup, &[placed(order)]).instrument(root).await);
            }
            ids
        },
    )
    .await;
    eventually("the batch", Duration::from_secs(20), || async {
        effects(&setup, "b-3").await == 1
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();
    assert_eq!(*behaviour.batch_sizes.lock().unwrap(), [1, 3]);

    let traces: Vec<(String, String)> = confirmations(&setup)
        .await
        .into_iter()
        .map(|row| {
            let trace = row.traceparent.split('-').nth(1).unwrap_or_default();
            (row.correlation_id, trace.to_owned())
        })
        .collect();
    let expected: Vec<(String, String)> = ["b-1", "b-2", "b-3"]
        .into_iter()
        .map(str::to_owned)
        .zip(writer_traces)
        .collect();
    // After the gate's own confirmation.
    assert_eq!(traces[1..], expected);
}

async fn outbox_traceparent(url: &str) -> String {
    use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl as _};
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        traceparent: String,
    }
    let mut conn = AsyncPgConnection::establish(url).await.unwrap();
    diesel::sql_query("SELECT traceparent FROM outbox")
        .get_result::<Row>(&mut conn)
        .await
        .unwrap()
        .traceparent
}

#[test]
fn grpc_metadata_carries_the_trace_both_ways() {
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    tracing::subscriber::with_default(subscriber, || {
        let client = tracing::info_span!("client call");
        let mut metadata = tonic::metadata::MetadataMap::new();
        client.in_scope(|| pg_jetstream::telemetry::inject_into_metadata(&mut metadata));
        assert!(metadata.get("traceparent").is_some());

        let server = tracing::info_span!("server call");
        pg_jetstream::telemetry::extract_from_metadata(&server, &metadata);
        assert_eq!(
            server.context().span().span_context().trace_id(),
            client.context().span().span_context().trace_id()
        );
    });
}
