//! Publish after commit against real NATS and PostgreSQL: a writer's events
//! go out from memory right after its commit; a consumer acknowledges a
//! message only once the events it caused are out; the relay forgets what
//! was confirmed and sweeps up what was not; a row published twice has one
//! effect, whether JetStream or the consumer's inbox drops the copy.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::events::OrderPlaced;
use async_nats::jetstream;
use diesel_async::{AsyncConnection as _, AsyncPgConnection};
use futures::StreamExt as _;
use pg_jetstream::envelope::headers;
use pg_jetstream::{
    Outbox,
    consumer::EventConsumer,
    envelope::OutgoingEvent,
    outbox::{Relay, RelayConfig, Written},
    provision::{ConsumerSpec, StreamSpec},
};
use tokio_util::sync::CancellationToken;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(20);

/// Rows in the outbox, confirmed or not.
async fn rows(setup: &Setup) -> i64 {
    count(&setup.url, "SELECT count(*) AS n FROM outbox").await
}

/// Writes `events` in one committed transaction through `outbox`; returns
/// what to publish.
async fn commit(setup: &Setup, outbox: &Outbox, events: Vec<OutgoingEvent>) -> Written {
    let mut conn = AsyncPgConnection::establish(&setup.url).await.unwrap();
    let outbox = outbox.clone();
    conn.transaction::<_, diesel::result::Error, _>(async move |conn| {
        outbox.append(conn, events).await
    })
    .await
    .unwrap()
}

/// A relay that deletes what `outbox` confirms every 100 ms and sweeps only
/// rows older than `sweep_after`.
fn relay_for(setup: &Setup, outbox: &Outbox, sweep_after: Duration) -> Relay {
    Relay::new(
        setup.pool.clone(),
        setup.js.clone(),
        RelayConfig {
            sweep_after,
            interval: Duration::from_millis(100),
            ..RelayConfig::default()
        },
    )
    .forgetting_for(outbox)
}

/// The `ce-id`s of the messages stored on `subject` in ORDER, in order.
async fn stored_ids(js: &jetstream::Context, subject: &str) -> Vec<String> {
    let stream = js.get_stream("ORDER").await.unwrap();
    let last = stream.get_info().await.unwrap().state.last_sequence;
    let mut ids = Vec::new();
    for sequence in 1..=last {
        let Ok(message) = stream.get_raw_message(sequence).await else {
            continue;
        };
        if message.subject.as_str() == subject {
            ids.push(
                message
                    .headers
                    .get(headers::ID)
                    .unwrap()
                    .as_str()
                    .to_owned(),
            );
        }
    }
    ids
}

fn strings(ids: &[uuid::Uuid]) -> Vec<String> {
    ids.iter().map(ToString::to_string).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_writer_publishes_right_after_its_commit_and_the_relay_forgets_the_rows() {
    let setup = setup().await;
    let outbox = Outbox::new("example/test").publishing_to(setup.js.clone());
    // A sweep an hour away: whatever goes out, the writer sent.
    let relay = relay_for(&setup, &outbox, Duration::from_secs(3600));
    let swept = relay.swept_counter();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(relay.run(shutdown.clone()));

    let written = commit(
        &setup,
        &outbox,
        vec![placed("o-1"), placed("o-2"), placed("o-3")],
    )
    .await;
    let ids = written.ids();
    outbox.publish(written).await.unwrap();
    // Acknowledged by JetStream when `publish` returns, in the order written.
    assert_eq!(stored_ids(&setup.js, "order.placed").await, strings(&ids));
    eventually("the confirmed rows deleted", WAIT, || async {
        rows(&setup).await == 0
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();
    assert_eq!(swept.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn events_committed_while_nats_is_down_wait_and_go_out_through_the_next_sweep() {
    let mut setup = setup().await;
    let mut js = setup.js.clone();
    js.set_timeout(Duration::from_millis(500));
    let outbox = Outbox::new("example/test").publishing_to(js);

    setup.infra.nats.kill();
    let written = commit(&setup, &outbox, vec![placed("o-1"), placed("o-2")]).await;
    let ids = written.ids();
    let error = outbox.publish(written).await.unwrap_err();
    assert!(error.to_string().contains("publish"), "{error}");
    assert_eq!(rows(&setup).await, 2, "the rows wait in the outbox");

    setup.infra.nats.start_again().await;
    // Rows age an hour before a sweep takes them, unless their writer
    // failed to publish them, as this one did: then they go at the next
    // look.
    let relay = relay_for(&setup, &outbox, Duration::from_secs(3600));
    let swept = relay.swept_counter();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(relay.run(shutdown.clone()));
    eventually("the sweep publishes the rows", WAIT, || async {
        rows(&setup).await == 0
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();
    assert_eq!(swept.load(Ordering::Relaxed), 2);
    // Once each, in the order written, whoever sent them.
    assert_eq!(stored_ids(&setup.js, "order.placed").await, strings(&ids));
}

/// A writer whose clock runs a minute ahead commits an event and dies before
/// publishing it: its row, the oldest in the outbox, says it was written a
/// minute from now. Rows are aged by the database's clock, so neither it
/// nor the rows other writers leave behind it wait for that minute.
#[tokio::test(flavor = "multi_thread")]
async fn a_writer_whose_clock_runs_ahead_holds_up_no_sweep() {
    let setup = setup().await;
    // No publisher: what these writers commit is the sweep's to send.
    let outbox = Outbox::new("example/test");
    let ahead = commit(&setup, &outbox, vec![placed("o-ahead")]).await.ids();
    let mut conn = AsyncPgConnection::establish(&setup.url).await.unwrap();
    // Written by the fast clock (`ce-time` is the writer's).
    diesel_async::RunQueryDsl::execute(
        diesel::sql_query("UPDATE outbox SET created_at = created_at + interval '60 seconds'"),
        &mut conn,
    )
    .await
    .unwrap();
    let behind = commit(&setup, &outbox, vec![placed("o-1"), placed("o-2")])
        .await
        .ids();

    let relay = relay_for(&setup, &outbox, Duration::from_millis(500));
    let swept = relay.swept_counter();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(relay.run(shutdown.clone()));
    eventually(
        "every row swept long before the fast clock's minute",
        Duration::from_secs(15),
        || async { rows(&setup).await == 0 },
    )
    .await;
    shutdown.cancel();
    task.await.unwrap();
    assert_eq!(swept.load(Ordering::Relaxed), 3);
    let expected: Vec<uuid::Uuid> = ahead.into_iter().chain(behind).collect();
    assert_eq!(
        stored_ids(&setup.js, "order.placed").await,
        strings(&expected)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_whose_events_did_not_go_out_acks_nothing_and_its_redelivery_publishes_them() {
    Box::pin(events_not_out_are_published_by_the_redelivery(|| {
        pg_jetstream::Router::new().on::<OrderPlaced>(pg_jetstream::Route::batched())
    }))
    .await;
}

/// The same, for a route in one statement, whose redelivery is refused by
/// `inbox_write` before it is known to be one.
#[tokio::test(flavor = "multi_thread")]
async fn a_route_in_one_statement_whose_events_did_not_go_out_has_them_published_by_its_redelivery()
{
    Box::pin(events_not_out_are_published_by_the_redelivery(|| {
        pg_jetstream::Router::new().on::<OrderPlaced>(pg_jetstream::Route::in_one_statement())
    }))
    .await;
}

/// A consumer commits an event's effect and its `order.confirmed`, then
/// cannot publish; its redelivery, to the next process, publishes the
/// stored event.
async fn events_not_out_are_published_by_the_redelivery(
    router: impl Fn() -> pg_jetstream::Router<Arc<Behaviour>>,
) {
    let setup = setup().await;
    append(&setup, &[placed("o-1")]).await;
    relay(&setup).sweep_once().await.unwrap();
    let behaviour = Arc::new(Behaviour::default());
    let consumer_with_outbox = |outbox: Outbox| {
        EventConsumer::new(
            setup.js.clone(),
            setup.pool.clone(),
            outbox,
            ConsumerSpec {
                ack_wait: Duration::from_secs(2),
                ..ConsumerSpec::new("inventory", "ORDER", &["order.placed"])
            },
            router(),
            Arc::clone(&behaviour),
        )
    };

    // The first process commits the effect and its `order.confirmed`, then
    // cannot publish: its broker connection is gone, as it would be in a
    // process killed between its commit and its publish.
    let lost = setup.infra.nats.client().await;
    let lost_js = jetstream::new(lost.clone());
    lost.drain().await.unwrap();
    let first = consumer_with_outbox(Outbox::new("example/test").publishing_to(lost_js));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(first.run(shutdown.clone()));
    eventually("the first delivery applied", WAIT, || async {
        effects(&setup, "o-1").await == 1
    })
    .await;
    let confirmations = confirmations(&setup).await;
    assert_eq!(confirmations.len(), 1);
    let row_id: String = {
        #[derive(diesel::QueryableByName)]
        struct Id {
            #[diesel(sql_type = diesel::sql_types::Text)]
            id: String,
        }
        let mut conn = AsyncPgConnection::establish(&setup.url).await.unwrap();
        diesel_async::RunQueryDsl::get_result::<Id>(
            diesel::sql_query(
                "SELECT event_id::text AS id FROM outbox WHERE subject = 'order.confirmed'",
            ),
            &mut conn,
        )
        .await
        .unwrap()
        .id
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let info = setup
        .js
        .get_stream("ORDER")
        .await
        .unwrap()
        .consumer_info("inventory")
        .await
        .unwrap();
    assert_eq!(
        info.num_ack_pending, 1,
        "a message whose events are not out is not acknowledged"
    );
    assert!(stored_ids(&setup.js, "order.confirmed").await.is_empty());
    shutdown.cancel();
    task.await.unwrap();

    // The next process gets the message again: the inbox knows it, and the
    // event it caused goes out from its stored row, under the same id. No
    // sweep runs within the hour: only the redelivery can publish it.
    let outbox = Outbox::new("example/test").publishing_to(setup.js.clone());
    let relay = relay_for(&setup, &outbox, Duration::from_secs(3600));
    let second = consumer_with_outbox(outbox);
    let stats = second.stats();
    let shutdown = CancellationToken::new();
    let relay_task = tokio::spawn(relay.run(shutdown.clone()));
    let task = tokio::spawn(second.run(shutdown.clone()));
    eventually("the redelivery acknowledged", WAIT, || async {
        stats.duplicates.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(
        stored_ids(&setup.js, "order.confirmed").await,
        [row_id],
        "the stored event, once, under its first id"
    );
    eventually("the confirmed row deleted", WAIT, || async {
        rows(&setup).await == 0
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();
    relay_task.await.unwrap();
    assert_eq!(effects(&setup, "o-1").await, 1);
    assert_eq!(stats.applied.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_published_twice_is_dropped_by_jetstream_inside_its_window_and_by_the_inbox_after() {
    let setup = setup().await;
    let outbox = Outbox::new("example/test").publishing_to(setup.js.clone());
    // Nothing forgets the rows: the sweep finds every one the writer sent.
    let sweeper = relay(&setup);

    // Inside the duplicate window: the writer's and the sweep's copies are
    // one message.
    let written = commit(&setup, &outbox, vec![placed("o-1")]).await;
    let ids = written.ids();
    outbox.publish(written).await.unwrap();
    assert_eq!(sweeper.sweep_once().await.unwrap(), 1);
    assert_eq!(stored_ids(&setup.js, "order.placed").await, strings(&ids));

    // Past the window (shortened here from its two minutes), JetStream
    // stores the copy, and the consumer's inbox applies it once.
    StreamSpec {
        duplicate_window: Duration::from_millis(200),
        ..StreamSpec::new("ORDER", "order")
    }
    .provision(&setup.js)
    .await
    .unwrap();
    let written = commit(&setup, &outbox, vec![placed("o-2")]).await;
    outbox.publish(written).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sweeper.sweep_once().await.unwrap(), 1);
    assert_eq!(stored_ids(&setup.js, "order.placed").await.len(), 3);

    let consumer = consumer(&setup, Arc::new(Behaviour::default()));
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    eventually("every copy settled", WAIT, || async {
        stats.applied.load(Ordering::Relaxed) + stats.duplicates.load(Ordering::Relaxed) == 3
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();
    assert_eq!(effects(&setup, "o-1").await, 1);
    assert_eq!(effects(&setup, "o-2").await, 1);
    assert_eq!(stats.duplicates.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn writers_and_a_sweep_racing_on_the_same_rows_cause_each_effect_once() {
    let setup = setup().await;
    let outbox = Outbox::new("example/test").publishing_to(setup.js.clone());
    // A sweep that takes every row the moment it is committed, racing the
    // writers' own publishes and the deletes of what they confirmed.
    let relay = Relay::new(
        setup.pool.clone(),
        setup.js.clone(),
        RelayConfig {
            sweep_after: Duration::ZERO,
            interval: Duration::from_millis(2),
            batch_size: 7,
        },
    )
    .forgetting_for(&outbox);
    let swept = relay.swept_counter();
    let consumer = consumer(&setup, Arc::new(Behaviour::default()));
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let relay_task = tokio::spawn(relay.run(shutdown.clone()));
    let consumer_task = tokio::spawn(consumer.run(shutdown.clone()));

    let writers: Vec<_> = (0..8)
        .map(|writer| {
            let outbox = outbox.clone();
            let url = setup.url.clone();
            tokio::spawn(async move {
                let mut conn = AsyncPgConnection::establish(&url).await.unwrap();
                for round in 0..25 {
                    let events = (0..2)
                        .map(|i| placed(&format!("w{writer}-{round}-{i}")))
                        .collect();
                    let appending = outbox.clone();
                    let written = conn
                        .transaction::<_, diesel::result::Error, _>(async move |conn| {
                            appending.append(conn, events).await
                        })
                        .await
                        .unwrap();
                    outbox.publish(written).await.unwrap();
                }
            })
        })
        .collect();
    for writer in futures::stream::iter(writers)
        .then(|writer| writer)
        .collect::<Vec<_>>()
        .await
    {
        writer.unwrap();
    }
    eventually("every event applied", WAIT, || async {
        stats.applied.load(Ordering::Relaxed) == 400
    })
    .await;
    eventually("the outbox empty", WAIT, || async {
        rows(&setup).await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    shutdown.cancel();
    relay_task.await.unwrap();
    consumer_task.await.unwrap();
    assert!(
        swept.load(Ordering::Relaxed) > 0,
        "the sweep never raced a writer"
    );
    assert_eq!(
        stream_messages(&setup.js, "ORDER").await,
        400,
        "JetStream kept a copy"
    );
    assert_eq!(
        count(&setup.url, "SELECT count(*) AS n FROM effects").await,
        400
    );
    assert_eq!(stats.duplicates.load(Ordering::Relaxed), 0);
}
