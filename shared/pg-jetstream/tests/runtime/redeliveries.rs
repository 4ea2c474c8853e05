//! Deliveries that no handler failed do not dead-letter: a message held
//! while its consumer is stopped again and again (a rolling deploy during a
//! database outage) is applied once when the database is back, however many
//! times it was delivered; one delivered past the bound on deliveries that
//! never settled, and still not applied, is dead-lettered without another
//! attempt; failed handlers are counted where every replica sees them.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::events::OrderPlaced;
use diesel_async::{AsyncConnection as _, AsyncPgConnection, SimpleAsyncConnection as _};
use pg_jetstream::db::SessionLimits;
use pg_jetstream::{
    Route, Router,
    consumer::{EventConsumer, RetryPolicy},
    provision::ConsumerSpec,
};
use tokio_util::sync::CancellationToken;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(20);

/// The test handler, with at most 2 failed attempts and `max_deliveries`
/// unsettled deliveries, on sessions that give up on a lock after 200 ms.
fn short_consumer(
    setup: &Setup,
    behaviour: Arc<Behaviour>,
    max_deliveries: i64,
) -> EventConsumer<Arc<Behaviour>> {
    let limits = SessionLimits {
        lock_timeout: Duration::from_millis(200),
        ..SessionLimits::default()
    };
    EventConsumer::new(
        setup.js.clone(),
        pg_jetstream::db::pool_with_limits(&setup.url, 4, &limits).unwrap(),
        setup.outbox.clone(),
        ConsumerSpec {
            ack_wait: Duration::from_secs(2),
            ..ConsumerSpec::new("inventory", "ORDER", &[])
        },
        Router::new().on::<OrderPlaced>(Route::single()),
        behaviour,
    )
    .with_retry(RetryPolicy {
        initial: Duration::from_millis(100),
        multiplier: 2,
        max: Duration::from_secs(1),
        max_deliver: 2,
        max_deliveries,
    })
}

/// Runs the consumer until it holds the message in a batch it keeps trying
/// (the table is locked), then stops it, as SIGTERM does: the message goes
/// back to JetStream, one more delivery that no handler failed (or a few:
/// a stopped consumer's open pull may take the message back and keep it
/// for an ack wait), until JetStream has delivered it `times` times.
async fn hold_and_stop(setup: &Setup, times: u64) {
    while delivered(setup).await < times {
        let (stats, shutdown, task) =
            run(short_consumer(setup, Arc::new(Behaviour::default()), 1000));
        eventually("the batch kept in hand", WAIT, || async {
            stats.batches_tried_again.load(Ordering::Relaxed) > 0
        })
        .await;
        shutdown.cancel();
        task.await.unwrap();
        assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 0);
    }
}

/// Publishes one event for `order_id`, then holds the table its handler
/// writes to while consumers are started and stopped until JetStream has
/// delivered it `times` times, none of them settled; then lets go.
async fn delivered_unsettled(setup: &Setup, order_id: &str, times: u64) {
    let mut holder = AsyncPgConnection::establish(&setup.url).await.unwrap();
    holder
        .batch_execute("BEGIN; LOCK TABLE effects IN EXCLUSIVE MODE")
        .await
        .unwrap();
    append(setup, &[placed(order_id)]).await;
    relay(setup).sweep_once().await.unwrap();
    hold_and_stop(setup, times).await;
    holder.batch_execute("ROLLBACK").await.unwrap();
}

/// Runs `consumer` on a task of its own.
fn run(
    consumer: EventConsumer<Arc<Behaviour>>,
) -> (
    Arc<pg_jetstream::consumer::ConsumerStats>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    (stats, shutdown, task)
}

/// How many deliveries JetStream has made (0 before the durable exists).
async fn delivered(setup: &Setup) -> u64 {
    let stream = setup.js.get_stream("ORDER").await.unwrap();
    stream
        .consumer_info("inventory")
        .await
        .map_or(0, |info| info.delivered.consumer_sequence)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_held_through_restarts_is_applied_once_and_never_dead_lettered() {
    let setup = setup().await;
    // Stopped until delivered four times as often as failed attempts are
    // allowed (and fewer times than the default bound on unsettled
    // deliveries, 64).
    delivered_unsettled(&setup, "refund", 8).await;
    let (stats, shutdown, task) = run(short_consumer(&setup, Arc::new(Behaviour::default()), 64));
    eventually("the effect", WAIT, || async {
        effects(&setup, "refund").await == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(effects(&setup, "refund").await, 1);
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 0);
    assert_eq!(stream_messages(&setup.js, "DLQ").await, 0);
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn past_the_bound_on_unsettled_deliveries_a_message_not_applied_is_dead_lettered_untried() {
    let setup = setup().await;
    // Past the 6 deliveries allowed without a settlement.
    delivered_unsettled(&setup, "never-settles", 6).await;
    let (stats, shutdown, task) = run(short_consumer(&setup, Arc::new(Behaviour::default()), 6));
    eventually("the dead letter", WAIT, || async {
        stats.dead_lettered.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(effects(&setup, "never-settles").await, 0, "no attempt made");
    assert_eq!(stream_messages(&setup.js, "DLQ").await, 1);
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_attempts_are_counted_across_consumers_and_dead_letter_at_the_limit() {
    let setup = setup().await;
    let behaviour = Arc::new(Behaviour::default());
    behaviour
        .transient_failures
        .lock()
        .unwrap()
        .insert("flaky".into(), 100);
    append(&setup, &[placed("flaky")]).await;
    relay(&setup).sweep_once().await.unwrap();

    // One failed attempt, then the consumer stops (another replica, a
    // restart): the count is in the database, not in the process.
    let first = short_consumer(&setup, Arc::clone(&behaviour), 6).with_retry(RetryPolicy {
        // Long enough that this consumer stops before the next attempt.
        initial: Duration::from_secs(5),
        multiplier: 2,
        max: Duration::from_secs(5),
        max_deliver: 2,
        max_deliveries: 6,
    });
    let (stats, shutdown, task) = run(first);
    eventually("the first failure", WAIT, || async {
        stats.retried.load(Ordering::Relaxed) == 1
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();

    let (stats, shutdown, task) = run(short_consumer(&setup, Arc::clone(&behaviour), 6));
    eventually("the dead letter", WAIT, || async {
        stats.dead_lettered.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(
        stats.retried.load(Ordering::Relaxed),
        0,
        "the second failure was the last"
    );
    let failures = count(
        &setup.url,
        "SELECT failures::bigint AS n FROM consumer_failures WHERE consumer = 'inventory'",
    )
    .await;
    assert_eq!(failures, 2);

    // Its replay (the same event again) fails again: a new round of
    // attempts, not a dead letter at the first failure.
    republish(&setup, 1, "replayed", None).await;
    eventually("the replay's first failure", WAIT, || async {
        stats.retried.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 1);
    let failures = count(
        &setup.url,
        "SELECT failures::bigint AS n FROM consumer_failures WHERE consumer = 'inventory'",
    )
    .await;
    assert_eq!(failures, 1);
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn old_inbox_rows_and_failure_counts_are_pruned_in_chunks() {
    let setup = setup_with(&["shared_preload_libraries=pg_stat_statements".into()]).await;
    let mut conn = AsyncPgConnection::establish(&setup.url).await.unwrap();
    // A backlog: 12,000 rows of each, older than the retention, and one
    // recent row of each that stays.
    conn.batch_execute(
        "CREATE EXTENSION pg_stat_statements;
         INSERT INTO inbox (consumer, event_id, received_at)
             SELECT 'inventory', gen_random_uuid(), now() - interval '30 days'
             FROM generate_series(1, 12000);
         INSERT INTO inbox (consumer, event_id) VALUES ('inventory', gen_random_uuid());
         INSERT INTO consumer_failures (consumer, event_id, failures, failed_at)
             SELECT 'inventory', gen_random_uuid(), 1, now() - interval '30 days'
             FROM generate_series(1, 12000);
         INSERT INTO consumer_failures (consumer, event_id, failures)
             VALUES ('inventory', gen_random_uuid(), 1);
         SELECT pg_stat_statements_reset();",
    )
    .await
    .unwrap();

    let (_, shutdown, task) = run(short_consumer(&setup, Arc::new(Behaviour::default()), 64)
        .with_inbox_retention(Duration::from_secs(7 * 24 * 3600)));
    eventually("the old rows pruned", WAIT, || async {
        count(&setup.url, "SELECT count(*) AS n FROM inbox").await == 1
            && count(&setup.url, "SELECT count(*) AS n FROM consumer_failures").await == 1
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();
    // Three deletes of at most 5,000 rows for each table.
    let deletes = count(
        &setup.url,
        "SELECT coalesce(sum(calls), 0)::bigint AS n FROM pg_stat_statements
         WHERE query LIKE 'DELETE FROM % WHERE (consumer, event_id) IN%'",
    )
    .await;
    assert_eq!(deletes, 6);
}
