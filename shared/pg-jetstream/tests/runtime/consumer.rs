//! The idempotent consumer against real NATS and PostgreSQL: duplicates,
//! retries, dead letters, panics, unknown types, shutdown mid-batch, batch
//! routes and their fallback.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::events::OrderPlaced;
use async_nats::HeaderMap;
use pg_jetstream::consumer::Processed;
use pg_jetstream::consumer::dead_letter_headers;
use pg_jetstream::envelope::headers;
use tokio_util::sync::CancellationToken;

use crate::common::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_duplicate_delivery_has_one_effect() {
    let setup = setup().await;
    append(&setup, &[placed("o-1")]).await;
    relay(&setup).sweep_once().await.unwrap();

    // The same event again under another JetStream message id, so that the
    // broker's de-duplication does not hide it: only the inbox stands between
    // it and a second effect.
    republish(&setup, 1, "another-id", None).await;
    assert_eq!(stream_messages(&setup.js, "ORDER").await, 2);

    let consumer = consumer(&setup, Arc::new(Behaviour::default()));
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    eventually("both deliveries handled", WAIT, || async {
        stats.applied.load(Ordering::Relaxed) + stats.duplicates.load(Ordering::Relaxed) == 2
    })
    .await;
    assert_eq!(effects(&setup, "o-1").await, 1);
    assert_eq!(stats.applied.load(Ordering::Relaxed), 1);
    assert_eq!(stats.duplicates.load(Ordering::Relaxed), 1);
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_failures_are_retried_with_growing_delays() {
    let setup = setup().await;
    let behaviour = Arc::new(Behaviour::default());
    behaviour
        .transient_failures
        .lock()
        .unwrap()
        .insert("o-1".into(), 2);
    append(&setup, &[placed("o-1")]).await;
    relay(&setup).sweep_once().await.unwrap();

    let consumer = consumer(&setup, Arc::clone(&behaviour));
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    eventually("the effect", WAIT, || async {
        effects(&setup, "o-1").await == 1
    })
    .await;

    let deliveries = behaviour.deliveries.lock().unwrap()["o-1"].clone();
    assert_eq!(deliveries.len(), 3, "two failures, then success");
    let first_gap = deliveries[1] - deliveries[0];
    let second_gap = deliveries[2] - deliveries[1];
    // The policy waits 100 ms after the first failure and 200 ms after the second.
    assert!(first_gap >= Duration::from_millis(100), "{first_gap:?}");
    assert!(second_gap >= Duration::from_millis(200), "{second_gap:?}");
    assert_eq!(stats.retried.load(Ordering::Relaxed), 2);
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 0);
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_go_to_the_dead_letter_queue_and_the_stream_keeps_flowing() {
    let setup = setup().await;
    let behaviour = Arc::new(Behaviour::default());
    behaviour.permanent.lock().unwrap().push("bad".into());
    behaviour
        .transient_failures
        .lock()
        .unwrap()
        .insert("flaky".into(), 100);
    append(&setup, &[placed("bad")]).await;
    relay(&setup).sweep_once().await.unwrap();

    // Garbage bytes under valid headers, and a message with no headers at all.
    let original = republish(&setup, 1, "garbage", Some(vec![0xff, 0xff, 0xff])).await;
    setup
        .js
        .publish("order.placed", "no headers".into())
        .await
        .unwrap()
        .await
        .unwrap();
    // One that fails every time: dead-lettered on its last allowed delivery.
    append(&setup, &[placed("flaky"), placed("good")]).await;
    relay(&setup).sweep_once().await.unwrap();

    let consumer = consumer(&setup, Arc::clone(&behaviour));
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    eventually("the good message", WAIT, || async {
        effects(&setup, "good").await == 1
    })
    .await;
    eventually("four dead letters", WAIT, || async {
        stats.dead_lettered.load(Ordering::Relaxed) == 4
    })
    .await;

    let letters = dead_letters(&setup, 4).await;
    assert_eq!(letters.len(), 4);
    for letter in &letters {
        assert_eq!(letter.subject.as_str(), "dlq.inventory.order.placed");
        assert_eq!(
            header(&letter.headers, dead_letter_headers::CONSUMER),
            "inventory"
        );
        assert_eq!(
            header(&letter.headers, dead_letter_headers::STREAM),
            "ORDER"
        );
        assert!(!header(&letter.headers, dead_letter_headers::STREAM_SEQUENCE).is_empty());
    }
    let reason = |seq: &str| {
        let letter = letters
            .iter()
            .find(|l| header(&l.headers, dead_letter_headers::STREAM_SEQUENCE) == seq)
            .unwrap_or_else(|| panic!("no dead letter for sequence {seq}"));
        (
            header(&letter.headers, dead_letter_headers::REASON).to_owned(),
            letter,
        )
    };
    let (bad, letter) = reason("1");
    assert_eq!(bad, "order bad is not acceptable");
    assert_eq!(
        letter.payload, original.payload,
        "the original body is kept"
    );
    assert_eq!(
        header(&letter.headers, headers::ID),
        header(&Some(original.headers.clone()), headers::ID)
    );
    assert_eq!(
        header(&letter.headers, dead_letter_headers::DELIVERIES),
        "1"
    );
    let (garbage, letter) = reason("2");
    assert!(
        garbage.starts_with("body is not a valid example.order.v1.OrderPlaced"),
        "{garbage}"
    );
    assert_eq!(letter.payload.as_ref(), [0xff, 0xff, 0xff]);
    let (no_headers, _) = reason("3");
    assert_eq!(no_headers, "missing header ce-specversion");
    let (flaky, letter) = reason("4");
    assert_eq!(
        flaky,
        "gave up after 4 failed attempts: the test dependency is down"
    );
    assert_eq!(
        header(&letter.headers, dead_letter_headers::DELIVERIES),
        "4"
    );

    // Terminated: nothing comes back to the consumer.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let info = setup
        .js
        .get_stream("ORDER")
        .await
        .unwrap()
        .consumer_info("inventory")
        .await
        .unwrap();
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.num_pending, 0);
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_handler_is_retried_and_the_loop_survives() {
    let setup = setup().await;
    let behaviour = Arc::new(Behaviour::default());
    // Twice: once in a batch's fast path, once more on its own.
    behaviour.panics.lock().unwrap().insert("o-1".into(), 2);
    append(&setup, &[placed("o-1"), placed("o-2")]).await;
    relay(&setup).sweep_once().await.unwrap();

    let consumer = consumer(&setup, Arc::clone(&behaviour)).with_concurrency(1);
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    eventually("both effects", WAIT, || async {
        effects(&setup, "o-1").await + effects(&setup, "o-2").await == 2
    })
    .await;
    assert!(stats.retried.load(Ordering::Relaxed) >= 1);
    assert_eq!(effects(&setup, "o-1").await, 1);
    assert_eq!(effects(&setup, "o-2").await, 1);
    // The connection that was mid-transaction when the handler panicked did
    // not leak its transaction into the pool.
    assert_eq!(
        count(&setup.url, "SELECT count(*) AS n FROM inbox").await,
        2
    );
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_event_type_is_acked_and_counted() {
    let setup = setup().await;
    let mut headers = HeaderMap::new();
    headers.insert(headers::SPEC_VERSION, "1.0");
    headers.insert(headers::ID, uuid::Uuid::now_v7().to_string().as_str());
    headers.insert(headers::TYPE, "example.order.v1.OrderGiftWrapped");
    headers.insert(headers::SOURCE, "example/order");
    headers.insert(headers::TIME, "2026-11-26T10:00:00Z");
    setup
        .js
        .publish_with_headers("order.placed", headers, "newer".into())
        .await
        .unwrap()
        .await
        .unwrap();
    append(&setup, &[placed("o-1")]).await;
    relay(&setup).sweep_once().await.unwrap();

    let consumer = consumer(&setup, Arc::new(Behaviour::default()));
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    eventually("the known event", WAIT, || async {
        effects(&setup, "o-1").await == 1
    })
    .await;
    eventually("the unknown event", WAIT, || async {
        stats.ignored.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 0);
    assert_eq!(stream_messages(&setup.js, "DLQ").await, 0);
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_in_the_middle_of_a_batch_loses_nothing() {
    let setup = setup().await;
    let events: Vec<_> = (0..200).map(|i| placed(&format!("o-{i}"))).collect();
    append(&setup, &events).await;
    relay(&setup).sweep_once().await.unwrap();

    let behaviour = Arc::new(Behaviour::default());
    *behaviour.work.lock().unwrap() = Duration::from_millis(10);
    let first = consumer(&setup, Arc::clone(&behaviour))
        .with_concurrency(2)
        .with_batch_size(10);
    let first_stats = first.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(first.run(shutdown.clone()));
    eventually("some progress", WAIT, || async {
        first_stats.applied.load(Ordering::Relaxed) >= 40
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();
    let applied_before = first_stats.applied.load(Ordering::Relaxed);
    assert!(
        applied_before < 200,
        "the shutdown came too late to test anything"
    );
    // Everything the first consumer started, it finished and acked or left
    // for redelivery; none is half-applied.
    let effects_now = count(&setup.url, "SELECT count(*) AS n FROM effects").await;
    assert_eq!(effects_now as u64, applied_before);

    // A new consumer gets the rest: the released messages at once, any still
    // in flight after the ack wait.
    *behaviour.work.lock().unwrap() = Duration::ZERO;
    let mut second = consumer(&setup, behaviour);
    second = second.with_concurrency(8);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(second.run(shutdown.clone()));
    eventually("all 200 effects", Duration::from_secs(60), || async {
        count(&setup.url, "SELECT count(*) AS n FROM effects").await == 200
    })
    .await;
    assert_eq!(
        count(
            &setup.url,
            "SELECT count(DISTINCT order_id) AS n FROM effects"
        )
        .await,
        200
    );
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failure_inside_a_batch_rolls_back_only_its_own_message() {
    let setup = setup().await;
    let behaviour = Arc::new(Behaviour::default());
    behaviour.permanent.lock().unwrap().push("bad".into());
    behaviour
        .transient_failures
        .lock()
        .unwrap()
        .insert("flaky".into(), 1);
    append(
        &setup,
        &[placed("a"), placed("bad"), placed("flaky"), placed("c")],
    )
    .await;
    relay(&setup).sweep_once().await.unwrap();
    // The same event twice within one batch.
    republish(&setup, 1, "copy", None).await;

    // How each delivery was settled, by order id.
    let settled: Arc<std::sync::Mutex<Vec<(String, i64, Processed)>>> = Arc::default();
    let hook = {
        let settled = Arc::clone(&settled);
        Arc::new(
            move |message: &async_nats::jetstream::Message, processed: Processed, _: Duration| {
                let order = header(&message.headers, headers::CORRELATION_ID).to_owned();
                let delivered = message.info().unwrap().delivered;
                settled.lock().unwrap().push((order, delivered, processed));
            },
        )
    };
    // One batch takes all five: they are in the stream before it starts.
    let consumer = consumer(&setup, Arc::clone(&behaviour))
        .with_concurrency(1)
        .with_batch_size(64)
        .with_hook(hook);
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    eventually("flaky applied", WAIT, || async {
        effects(&setup, "flaky").await == 1
    })
    .await;
    assert_eq!(effects(&setup, "a").await, 1);
    assert_eq!(effects(&setup, "c").await, 1);
    assert_eq!(effects(&setup, "bad").await, 0);
    // The healthy messages were applied on their first delivery: the
    // neighbours' failures did not send them back to the stream.
    let settled = settled.lock().unwrap().clone();
    for order in ["a", "c"] {
        let applied: Vec<_> = settled
            .iter()
            .filter(|(o, _, p)| o == order && *p == Processed::Applied)
            .collect();
        assert_eq!(applied.len(), 1, "{order}: {settled:?}");
        assert_eq!(applied[0].1, 1, "{order} was delivered again: {settled:?}");
    }
    assert_eq!(stats.duplicates.load(Ordering::Relaxed), 1);
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 1);
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_route_applies_a_batch_in_one_call_and_one_by_one_when_it_fails() {
    let setup = setup().await;
    let behaviour = Arc::new(Behaviour::default());
    behaviour.permanent.lock().unwrap().push("bad".into());
    let batch_consumer = || {
        let router = pg_jetstream::Router::new().on::<OrderPlaced>(pg_jetstream::Route::batched());
        consumer_with(
            &setup,
            pg_jetstream::provision::ConsumerSpec::new("inventory", "ORDER", &["order.placed"]),
            router,
            Arc::clone(&behaviour),
        )
        .with_concurrency(1)
        .with_batch_size(64)
    };

    // Arrived together: one batch, one call.
    let shutdown = CancellationToken::new();
    let (task, ids) = delivered_together(
        &setup,
        &behaviour,
        "gate-1",
        || tokio::spawn(batch_consumer().run(shutdown.clone())),
        async || append(&setup, &[placed("a"), placed("b"), placed("c")]).await,
    )
    .await;
    eventually("a, b and c applied", WAIT, || async {
        effects(&setup, "c").await == 1
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();
    assert_eq!(*behaviour.batch_sizes.lock().unwrap(), [1, 3]);
    for order in ["a", "b"] {
        assert_eq!(effects(&setup, order).await, 1, "{order}");
    }
    // Each emitted event is caused by, and correlated like, its own event.
    let expected: Vec<_> = ids
        .iter()
        .zip(["a", "b", "c"])
        .map(|(id, order)| (*id, order.to_owned()))
        .collect();
    assert_eq!(causes(&setup).await[1..], expected);

    // One bad event fails the call: the batch is redone one event at a
    // time, the bad one is dead-lettered and its neighbours applied.
    behaviour.batch_sizes.lock().unwrap().clear();
    let consumer = batch_consumer();
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let (task, ids) = delivered_together(
        &setup,
        &behaviour,
        "gate-2",
        || tokio::spawn(consumer.run(shutdown.clone())),
        async || append(&setup, &[placed("d"), placed("bad"), placed("e")]).await,
    )
    .await;
    eventually("bad dead-lettered", WAIT, || async {
        stats.dead_lettered.load(Ordering::Relaxed) == 1
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();
    assert_eq!(*behaviour.batch_sizes.lock().unwrap(), [1, 3, 1, 1, 1]);
    assert_eq!(stats.applied.load(Ordering::Relaxed), 3);
    assert_eq!(effects(&setup, "d").await, 1);
    assert_eq!(effects(&setup, "e").await, 1);
    assert_eq!(effects(&setup, "bad").await, 0);
    // The sweeps that brought d, bad and e out took the earlier rows along:
    // what the outbox holds now is what this batch emitted.
    let confirmed = causes(&setup).await;
    assert_eq!(
        confirmed[confirmed.len() - 2..],
        [(ids[0], "d".to_owned()), (ids[2], "e".to_owned())]
    );
    assert_eq!(dead_letters(&setup, 1).await.len(), 1);
}
