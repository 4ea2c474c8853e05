//! JSON log lines about a saga name its order and its trace, whether they
//! are written inside a consumer's span or by the runtime around it. Its own
//! test binary: it installs the global subscriber.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use diesel_async::{AsyncConnection as _, AsyncPgConnection};
use pg_jetstream::{
    Context, Handler, HandlerError, Outbox, Route, Router,
    consumer::{EventConsumer, RetryPolicy},
    envelope::OutgoingEvent,
    outbox::{Relay, RelayConfig},
    provision::{ConsumerSpec, StreamSpec},
};
use shop_proto::order::v1::OrderPlaced;
use shop_service::{LogFormat, Telemetry};
use shop_test_support::TestInfra;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// Log output kept in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'w> tracing_subscriber::fmt::MakeWriter<'w> for Captured {
    type Writer = Self;

    fn make_writer(&'w self) -> Self::Writer {
        self.clone()
    }
}

impl Captured {
    fn with_message(&self, message: &str) -> Vec<serde_json::Value> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
            .filter(|line| line["message"] == message)
            .collect()
    }
}

/// Logs inside its span, and fails as many times as `failures` says.
struct Reserve {
    failures: AtomicU32,
}

impl Handler<OrderPlaced> for Reserve {
    async fn handle(&self, _: &mut Context<'_>, _: OrderPlaced) -> Result<(), HandlerError> {
        tracing::info!("reserving");
        let left = self.failures.load(Ordering::SeqCst);
        if left > 0 {
            self.failures.store(left - 1, Ordering::SeqCst);
            return Err(HandlerError::retryable("the database blinked"));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn json_lines_about_a_saga_carry_its_order_id_and_trace_id() {
    let logs = Captured::default();
    let _telemetry = Telemetry::init_with_writer("test", LogFormat::Json, logs.clone()).unwrap();
    let infra = TestInfra::start().await;
    let url = infra.postgres.create_database("svc").await;
    pg_jetstream::db::migrate(&url, vec![pg_jetstream::MIGRATIONS])
        .await
        .unwrap();
    let pool = pg_jetstream::db::pool(&url, 4).unwrap();
    let js = jetstream::new(infra.nats.client().await);
    StreamSpec::new("ORDER", "order")
        .provision(&js)
        .await
        .unwrap();
    StreamSpec::dead_letters().provision(&js).await.unwrap();
    let outbox = Outbox::new("shop/order");

    // The event is written inside a span that stands for PlaceOrder.
    let place_order = tracing::info_span!("place order");
    let trace_id = pg_jetstream::telemetry::trace_id(&place_order);
    assert_eq!(trace_id.len(), 32, "{trace_id:?}");
    let event = OutgoingEvent::new(&OrderPlaced {
        order_id: "o-1".into(),
        user_id: "u-1".into(),
        ..Default::default()
    })
    .correlated("o-1");
    let mut conn = AsyncPgConnection::establish(&url).await.unwrap();
    let appending = outbox.clone();
    // This outbox has no publisher: the sweep below publishes the row.
    let _written = conn
        .transaction::<_, diesel::result::Error, _>(async move |conn| {
            appending.append(conn, vec![event]).await
        })
        .instrument(place_order)
        .await
        .unwrap();
    Relay::new(
        pool.clone(),
        js.clone(),
        RelayConfig {
            sweep_after: Duration::ZERO,
            ..RelayConfig::default()
        },
    )
    .sweep_once()
    .await
    .unwrap();

    let failures = Reserve {
        failures: AtomicU32::new(1),
    };
    let consumer = EventConsumer::new(
        js.clone(),
        pool.clone(),
        outbox,
        ConsumerSpec::new("inventory", "ORDER", &[]),
        Router::new().on::<OrderPlaced>(Route::single()),
        failures,
    )
    .with_retry(RetryPolicy {
        initial: Duration::from_millis(50),
        ..RetryPolicy::default()
    });
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    let started = Instant::now();
    while logs.with_message("reserving").len() < 2 {
        assert!(started.elapsed() < Duration::from_secs(20), "never retried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    task.await.unwrap();

    // Inside the handler: the consumer's span names both.
    for line in logs.with_message("reserving") {
        let spans = line["spans"].as_array().unwrap();
        assert!(
            spans
                .iter()
                .any(|span| span["order_id"] == "o-1" && span["trace_id"] == trace_id.as_str()),
            "{line}"
        );
    }
    // Around it: the runtime's own line about the retry names both too.
    let retried = logs.with_message("handler failed; retrying");
    assert_eq!(retried.len(), 1, "{retried:?}");
    assert_eq!(retried[0]["order_id"], "o-1");
    assert_eq!(retried[0]["trace_id"], trace_id.as_str());
}
