//! Batches that compete for the same rows, and failures that say nothing
//! about the messages: neither may spend a message's deliveries.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{Setup, append, count, eventually, relay, setup};
use crate::events::OrderPlaced;
use diesel::sql_types::Integer;
use diesel_async::SimpleAsyncConnection as _;
use diesel_async::{AsyncConnection as _, AsyncPgConnection};
use pg_jetstream::telemetry::ConsumerLabels;
use pg_jetstream::{
    Context, Handler, HandlerError, Route, Router,
    consumer::{EventConsumer, LockNames, Processed},
    envelope::OutgoingEvent,
    provision::ConsumerSpec,
    telemetry::MessagingMetrics,
};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);
const ROWS: i32 = 5;

/// The rows an event updates, in the order it updates them: its `order_id`
/// is `"3,1,4"`.
fn rows_of(event: &OrderPlaced) -> Vec<i32> {
    event
        .order_id
        .split(',')
        .map(|row| row.parse().unwrap())
        .collect()
}

/// Adds one to each of the event's rows in turn, pausing between them so
/// that concurrent batches overlap; names the rows as what it locks.
struct Bump;

impl Handler<OrderPlaced> for Bump {
    async fn handle(&self, cx: &mut Context<'_>, event: OrderPlaced) -> Result<(), HandlerError> {
        use diesel_async::RunQueryDsl as _;
        for row in rows_of(&event) {
            diesel::sql_query("UPDATE counters SET n = n + 1 WHERE id = $1")
                .bind::<Integer, _>(row)
                .execute(cx.conn())
                .await?;
            diesel::sql_query("SELECT pg_sleep(0.002)")
                .execute(cx.conn())
                .await?;
        }
        Ok(())
    }
}

impl LockNames<OrderPlaced> for Bump {
    async fn lock_names(
        &self,
        _: &mut AsyncPgConnection,
        events: Vec<&OrderPlaced>,
    ) -> diesel::QueryResult<Vec<String>> {
        Ok(events
            .iter()
            .flat_map(|event| rows_of(event))
            .map(|row| format!("counter:{row}"))
            .collect())
    }
}

async fn counters(setup: &Setup) {
    let mut conn = AsyncPgConnection::establish(&setup.url).await.unwrap();
    conn.batch_execute(&format!(
        "CREATE TABLE counters (id INT PRIMARY KEY, n INT NOT NULL);
         INSERT INTO counters SELECT id, 0 FROM generate_series(1, {ROWS}) AS id"
    ))
    .await
    .unwrap();
}

fn consumer<S: Send + Sync + 'static>(
    setup: &Setup,
    router: Router<S>,
    state: S,
) -> EventConsumer<S> {
    EventConsumer::new(
        setup.js.clone(),
        setup.pool.clone(),
        setup.outbox.clone(),
        ConsumerSpec::new("inventory", "ORDER", &[]),
        router,
        state,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn batches_that_name_their_locks_never_deadlock() {
    let setup = setup().await;
    counters(&setup).await;
    // Every event updates three of the five rows, in an order of its own:
    // batches taking their row locks as they go would deadlock.
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let events: Vec<OutgoingEvent> = (0..400)
        .map(|_| {
            let mut rows: Vec<i32> = (1..=ROWS).collect();
            for i in (1..rows.len()).rev() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                rows.swap(i, (seed % (i as u64 + 1)) as usize);
            }
            rows.truncate(3);
            let rows: Vec<String> = rows.iter().map(i32::to_string).collect();
            OutgoingEvent::new(&OrderPlaced {
                order_id: rows.join(","),
                ..Default::default()
            })
        })
        .collect();
    append(&setup, &events).await;
    relay(&setup).sweep_once().await.unwrap();

    // Two replicas of four concurrent small batches each, on one durable.
    let router = || Router::new().on::<OrderPlaced>(Route::single().locking());
    let shutdown = CancellationToken::new();
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let consumer = consumer(&setup, router(), Bump)
            .with_concurrency(4)
            .with_batch_size(8);
        replicas.push((
            consumer.stats(),
            tokio::spawn(consumer.run(shutdown.clone())),
        ));
    }
    eventually("every event applied", WAIT, || async {
        count(&setup.url, "SELECT count(*) AS n FROM inbox").await == 400
    })
    .await;
    assert_eq!(
        count(&setup.url, "SELECT sum(n)::int8 AS n FROM counters").await,
        400 * 3
    );
    for (stats, _) in &replicas {
        assert_eq!(stats.batches_tried_again.load(Ordering::Relaxed), 0);
        assert_eq!(stats.retried.load(Ordering::Relaxed), 0);
    }
    shutdown.cancel();
    for (_, task) in replicas {
        task.await.unwrap();
    }
}

/// Fails with a given SQLSTATE the first `failures` times, then records.
struct FailsWith {
    sqlstate: &'static str,
    failures: AtomicU32,
}

impl Handler<OrderPlaced> for FailsWith {
    async fn handle(&self, cx: &mut Context<'_>, _: OrderPlaced) -> Result<(), HandlerError> {
        use diesel_async::RunQueryDsl as _;
        let state = self;
        let fail = state
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(1)
            })
            .is_ok();
        if fail {
            let message = match state.sqlstate {
                "40P01" => "deadlock detected",
                _ => "the test fails on purpose",
            };
            diesel::sql_query(format!(
                "DO $$ BEGIN RAISE EXCEPTION '{message}' USING ERRCODE = '{}'; END $$",
                state.sqlstate
            ))
            .execute(cx.conn())
            .await?;
        }
        diesel::sql_query("INSERT INTO effects (event_id, order_id) VALUES ($1, 'x')")
            .bind::<diesel::sql_types::Uuid, _>(cx.envelope().id)
            .execute(cx.conn())
            .await?;
        Ok(())
    }
}

/// Runs one event through a handler that fails `failures` times with
/// `sqlstate`; returns each settled delivery's count and outcome, and how
/// many times the batch was tried again in place.
async fn deliveries_of_one_event(
    sqlstate: &'static str,
    failures: u32,
) -> (Vec<(i64, Processed)>, u64) {
    let setup = setup().await;
    append(&setup, &[crate::common::placed("x")]).await;
    relay(&setup).sweep_once().await.unwrap();
    let settled: Arc<Mutex<Vec<(i64, Processed)>>> = Arc::default();
    let hook = {
        let settled = Arc::clone(&settled);
        Arc::new(
            move |message: &async_nats::jetstream::Message, processed: Processed, _: Duration| {
                let delivered = message.info().unwrap().delivered;
                settled.lock().unwrap().push((delivered, processed));
            },
        )
    };
    let metrics = MessagingMetrics::default();
    let state = FailsWith {
        sqlstate,
        failures: AtomicU32::new(failures),
    };
    let consumer = consumer(
        &setup,
        Router::new().on::<OrderPlaced>(Route::single()),
        state,
    )
    .with_retry(pg_jetstream::consumer::RetryPolicy {
        initial: Duration::from_millis(100),
        multiplier: 2,
        max: Duration::from_secs(1),
        max_deliver: 4,
        max_deliveries: 16,
    })
    .with_hook(hook)
    .with_metrics(metrics.clone());
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    eventually("the event applied", WAIT, || async {
        count(&setup.url, "SELECT count(*) AS n FROM effects").await == 1
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();
    let settled = settled.lock().unwrap().clone();
    let tried_again = stats.batches_tried_again.load(Ordering::Relaxed);
    // The same count on /metrics.
    let exported = metrics
        .batches_tried_again
        .get_or_create(&ConsumerLabels {
            consumer: "inventory".into(),
        })
        .get();
    assert_eq!(exported, tried_again);
    (settled, tried_again)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deadlock_is_tried_again_in_place_without_spending_a_delivery() {
    // More failures than the four deliveries allowed: none of them counts.
    let (settled, tried_again) = Box::pin(deliveries_of_one_event("40P01", 5)).await;
    assert_eq!(settled, vec![(1, Processed::Applied)]);
    assert_eq!(tried_again, 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_serialization_failure_is_tried_again_in_place() {
    let (settled, tried_again) = Box::pin(deliveries_of_one_event("40001", 2)).await;
    assert_eq!(settled, vec![(1, Processed::Applied)]);
    assert_eq!(tried_again, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failure_of_the_handler_itself_spends_a_delivery() {
    // A check violation is about what the handler did: retried by a nak.
    let (settled, tried_again) = Box::pin(deliveries_of_one_event("23514", 1)).await;
    assert_eq!(
        settled,
        vec![(1, Processed::Retried), (2, Processed::Applied)]
    );
    assert_eq!(tried_again, 0);
}
