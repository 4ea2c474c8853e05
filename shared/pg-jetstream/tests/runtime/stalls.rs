//! Stalls that are nobody's messages' fault must not turn into dead letters:
//! a batch waiting on a lock someone else holds, and the messages fetched
//! behind it, keep their leases for as long as the lock is held; a dead
//! letter that cannot be stored leaves its message to be retried.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel_async::{AsyncConnection as _, AsyncPgConnection, SimpleAsyncConnection as _};
use pg_jetstream::consumer::ConsumerStats;
use pg_jetstream::consumer::Processed;
use pg_jetstream::provision::StreamSpec;
use tokio_util::sync::CancellationToken;

use crate::common::*;

async fn ack_pending(setup: &Setup) -> u64 {
    let info = setup
        .js
        .get_stream("ORDER")
        .await
        .unwrap()
        .consumer_info("inventory")
        .await
        .unwrap();
    u64::try_from(info.num_ack_pending).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lock_held_past_every_redelivery_costs_no_delivery_and_no_dead_letter() {
    let setup = setup().await;
    let behaviour = Arc::new(Behaviour::default());
    // Which delivery of each message was settled, and how.
    let settled: Arc<Mutex<Vec<(i64, Processed)>>> = Arc::default();
    let seen = Arc::clone(&settled);
    let consumer = consumer(&setup, Arc::clone(&behaviour))
        .with_batch_size(4)
        .with_hook(Arc::new(move |message, processed, _| {
            let delivered = message.info().unwrap().delivered;
            seen.lock().unwrap().push((delivered, processed));
        }));
    let stats: Arc<ConsumerStats> = consumer.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(shutdown.clone()));

    // Another session holds the table the handler writes to: every insert
    // waits, and gives up after the pool's 5 s lock timeout.
    let mut holder = AsyncPgConnection::establish(&setup.url).await.unwrap();
    holder
        .batch_execute("BEGIN; LOCK TABLE effects IN EXCLUSIVE MODE")
        .await
        .unwrap();
    let relay = relay(&setup);
    append(&setup, &[placed("first")]).await;
    relay.sweep_once().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // These arrive while the first batch is stuck: fetched, not started.
    let behind: Vec<String> = (0..20).map(|i| format!("behind-{i}")).collect();
    for order in &behind {
        append(&setup, &[placed(order)]).await;
    }
    relay.sweep_once().await.unwrap();
    // Longer than max_deliver (4) x the ack wait (2 s), and past two lock
    // timeouts.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(effects(&setup, "first").await, 0, "the lock is still held");
    assert!(
        stats.batches_tried_again.load(Ordering::Relaxed) >= 2,
        "the stuck batch gave up on the lock and was tried again in place"
    );
    holder.batch_execute("ROLLBACK").await.unwrap();

    eventually("every message applied", Duration::from_secs(30), || async {
        stats.applied.load(Ordering::Relaxed) == 21
    })
    .await;
    for order in behind.iter().chain([&"first".to_owned()]) {
        assert_eq!(effects(&setup, order).await, 1, "{order}");
    }
    let settled = settled.lock().unwrap().clone();
    assert_eq!(settled.len(), 21, "{settled:?}");
    assert!(
        settled
            .iter()
            .all(|&(delivered, processed)| delivered == 1 && processed == Processed::Applied),
        "each message settled on its first delivery: {settled:?}"
    );
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 0);
    assert_eq!(stream_messages(&setup.js, "DLQ").await, 0);
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_that_cannot_be_stored_is_retried_never_terminated() {
    let setup = setup().await;
    setup.js.delete_stream("DLQ").await.unwrap();
    let behaviour = Arc::new(Behaviour::default());
    behaviour.permanent.lock().unwrap().push("bad".into());
    let consumer = consumer(&setup, Arc::clone(&behaviour));
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    append(&setup, &[placed("bad")]).await;
    relay(&setup).sweep_once().await.unwrap();

    // Delivered again and again (the retry policy's longest delay apart),
    // never terminated: the message stays pending on the consumer.
    eventually(
        "a second delivery of the unstorable dead letter",
        Duration::from_secs(20),
        || async {
            behaviour
                .deliveries
                .lock()
                .unwrap()
                .get("bad")
                .is_some_and(|deliveries| deliveries.len() >= 2)
        },
    )
    .await;
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 0);
    assert_eq!(
        ack_pending(&setup).await,
        1,
        "still the consumer's to settle"
    );

    // Once the queue is back, the dead letter is stored and the original
    // terminated.
    StreamSpec::dead_letters()
        .provision(&setup.js)
        .await
        .unwrap();
    eventually(
        "the dead letter is stored",
        Duration::from_secs(20),
        || async { stats.dead_lettered.load(Ordering::Relaxed) == 1 },
    )
    .await;
    assert_eq!(stream_messages(&setup.js, "DLQ").await, 1);
    eventually(
        "the original is settled",
        Duration::from_secs(5),
        || async { ack_pending(&setup).await == 0 },
    )
    .await;
    shutdown.cancel();
    task.await.unwrap();
}
