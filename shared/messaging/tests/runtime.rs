//! The messaging runtime against real NATS and PostgreSQL: outbox, relay,
//! idempotent consumer, retries, dead letters, shutdown.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::HeaderMap;
use diesel_async::{AsyncConnection as _, AsyncPgConnection, SimpleAsyncConnection as _};
use futures::StreamExt as _;
use shop_messaging::consumer::dead_letter_headers;
use shop_messaging::envelope::headers;
use shop_messaging::{Processed, Relay};
use shop_proto::order::v1::OrderPlaced;
use tokio_util::sync::CancellationToken;

use common::*;

const WAIT: Duration = Duration::from_secs(20);

/// Outbox rows not yet published (the tests' outbox has no publisher).
async fn pending(setup: &Setup) -> i64 {
    count(&setup.url, "SELECT count(*) AS n FROM outbox").await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_committed_while_the_relay_was_down_is_published_once_after_restart() {
    let mut setup = setup().await;
    let behaviour = Arc::new(Behaviour::default());
    let shutdown = CancellationToken::new();
    let consumer = tokio::spawn(consumer(&setup, Arc::clone(&behaviour)).run(shutdown.clone()));

    // The relay dies with the broker gone: the row is committed, never published.
    setup.infra.nats.kill();
    append(&setup, &[placed("o-1")]).await;
    let first = relay(&setup);
    let error = first.sweep_once().await.unwrap_err();
    assert!(error.to_string().contains("publish"), "{error}");
    drop(first);

    setup.infra.nats.start_again().await;
    let restarted = relay(&setup);
    let published = restarted.swept_counter();
    let relay_shutdown = CancellationToken::new();
    let relay_task = tokio::spawn(restarted.run(relay_shutdown.clone()));

    eventually("the effect", WAIT, || async {
        effects(&setup, "o-1").await == 1
    })
    .await;
    // Let any duplicate have its chance before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(effects(&setup, "o-1").await, 1);
    assert_eq!(published.load(Ordering::Relaxed), 1);
    assert_eq!(stream_messages(&setup.js, "ORDER").await, 1);
    assert_eq!(pending(&setup).await, 0);

    relay_shutdown.cancel();
    shutdown.cancel();
    relay_task.await.unwrap();
    consumer.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_whose_ack_was_lost_is_dropped_by_jetstream_when_repeated() {
    let setup = setup().await;
    append(&setup, &[placed("o-1"), placed("o-2")]).await;

    // The sweep publishes, then its deletes fail to commit: as if the acks
    // were lost or the relay crashed right after publishing. (A deferred
    // trigger runs at commit, after the publish.)
    let mut conn = AsyncPgConnection::establish(&setup.url).await.unwrap();
    conn.batch_execute(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'deleting refused'; END; $$;
         CREATE CONSTRAINT TRIGGER refuse AFTER DELETE ON outbox
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse();",
    )
    .await
    .unwrap();
    let relay = relay(&setup);
    let error = relay.sweep_once().await.unwrap_err();
    assert!(error.to_string().contains("deleting refused"), "{error}");
    assert_eq!(stream_messages(&setup.js, "ORDER").await, 2);
    assert_eq!(pending(&setup).await, 2);

    conn.batch_execute("DROP TRIGGER refuse ON outbox")
        .await
        .unwrap();
    assert_eq!(relay.sweep_once().await.unwrap(), 2);
    assert_eq!(
        stream_messages(&setup.js, "ORDER").await,
        2,
        "JetStream kept a duplicate"
    );

    let behaviour = Arc::new(Behaviour::default());
    let consumer = consumer(&setup, behaviour);
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    eventually("both effects", WAIT, || async {
        effects(&setup, "o-1").await + effects(&setup, "o-2").await == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(effects(&setup, "o-1").await, 1);
    assert_eq!(effects(&setup, "o-2").await, 1);
    assert_eq!(stats.applied.load(Ordering::Relaxed), 2);
    shutdown.cancel();
    task.await.unwrap();
}

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

async fn dead_letters(setup: &Setup, expected: usize) -> Vec<async_nats::jetstream::Message> {
    let stream = setup.js.get_stream("DLQ").await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config::default())
        .await
        .unwrap();
    let mut batch = consumer
        .fetch()
        .max_messages(expected + 1)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .unwrap();
    let mut letters = Vec::new();
    while let Some(message) = batch.next().await {
        letters.push(message.unwrap());
    }
    letters
}

fn header<'a>(headers: &'a Option<HeaderMap>, name: &str) -> &'a str {
    headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str())
        .unwrap_or_default()
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
        garbage.starts_with("body is not a valid shop.order.v1.OrderPlaced"),
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
    headers.insert(headers::TYPE, "shop.order.v1.OrderGiftWrapped");
    headers.insert(headers::SOURCE, "shop/order");
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
async fn two_relays_publish_5000_events_with_none_lost_or_doubled() {
    let setup = setup().await;
    for chunk in 0..10 {
        let events: Vec<_> = (0..500)
            .map(|i| placed(&format!("o-{}", chunk * 500 + i)))
            .collect();
        append(&setup, &events).await;
    }
    let relays = [relay(&setup), relay(&setup)];
    let counters: Vec<_> = relays.iter().map(Relay::swept_counter).collect();
    let shutdown = CancellationToken::new();
    let tasks: Vec<_> = relays
        .into_iter()
        .map(|relay| tokio::spawn(relay.run(shutdown.clone())))
        .collect();

    eventually("every row published", Duration::from_secs(60), || async {
        pending(&setup).await == 0
    })
    .await;
    shutdown.cancel();
    for task in tasks {
        task.await.unwrap();
    }
    let published: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    assert_eq!(
        published.iter().sum::<u64>(),
        5000,
        "published per relay: {published:?}"
    );
    assert_eq!(stream_messages(&setup.js, "ORDER").await, 5000);

    // Every event in the stream once: distinct ids, 5000 of them.
    let consumer = setup
        .js
        .get_stream("ORDER")
        .await
        .unwrap()
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut ids = std::collections::HashSet::new();
    let mut messages = consumer
        .fetch()
        .max_messages(6000)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap();
    while let Some(message) = messages.next().await {
        let message = message.unwrap();
        ids.insert(header(&message.headers, headers::ID).to_owned());
    }
    assert_eq!(ids.len(), 5000);
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
async fn provisioning_creates_then_updates_in_place() {
    let setup = setup().await;
    // `setup` provisioned ORDER once; a new deploy changes its settings.
    let mut spec = shop_messaging::StreamSpec::new("ORDER", "order");
    spec.max_age = Duration::from_secs(3600);
    spec.duplicate_window = Duration::from_secs(60);
    spec.provision(&setup.js).await.unwrap();
    spec.provision(&setup.js).await.unwrap();
    let info = setup
        .js
        .get_stream("ORDER")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    assert_eq!(info.max_age, Duration::from_secs(3600));
    assert_eq!(info.duplicate_window, Duration::from_secs(60));
    assert_eq!(
        info.storage,
        async_nats::jetstream::stream::StorageType::File
    );
    assert_eq!(info.subjects, ["order.>"]);
    assert_eq!(info.max_bytes, shop_messaging::provision::STREAM_MAX_BYTES);
    assert_eq!(info.max_message_size, 1 << 20);
    assert_eq!(
        info.discard,
        async_nats::jetstream::stream::DiscardPolicy::New
    );

    let mut consumer =
        shop_messaging::ConsumerSpec::new("payment", "ORDER", &["order.placed", "order.cancelled"]);
    consumer.provision(&setup.js).await.unwrap();
    consumer.max_ack_pending = 64;
    consumer.ack_backoff = vec![Duration::from_secs(1), Duration::from_secs(5)];
    consumer.provision(&setup.js).await.unwrap();
    let info = setup
        .js
        .get_stream("ORDER")
        .await
        .unwrap()
        .consumer_info("payment")
        .await
        .unwrap()
        .config
        .clone();
    assert_eq!(info.max_ack_pending, 64);
    assert_eq!(
        info.backoff,
        [Duration::from_secs(1), Duration::from_secs(5)]
    );
    assert_eq!(info.filter_subjects, ["order.placed", "order.cancelled"]);
    assert_eq!(
        info.ack_policy,
        async_nats::jetstream::consumer::AckPolicy::Explicit
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_stream_refuses_new_events_which_wait_in_the_outbox() {
    let setup = setup().await;
    shop_messaging::StreamSpec::new("ORDER", "order")
        .with_max_bytes(2048)
        .provision(&setup.js)
        .await
        .unwrap();
    let relay = relay(&setup);
    let mut published = 0;
    let refused = loop {
        append(&setup, &[placed(&format!("o-{published}"))]).await;
        match relay.sweep_once().await {
            Ok(_) => published += 1,
            Err(error) => break error,
        }
        assert!(published < 100, "2 KiB never filled");
    };
    assert!(published > 0);
    assert!(refused.to_string().contains("publish"), "{refused}");
    // Nothing already stored was dropped to make room, and the refused
    // event is still the outbox's.
    assert_eq!(stream_messages(&setup.js, "ORDER").await, published);
    assert_eq!(pending(&setup).await, 1);

    // Room again (an operator raised the limit): it goes out.
    shop_messaging::StreamSpec::new("ORDER", "order")
        .provision(&setup.js)
        .await
        .unwrap();
    relay.sweep_once().await.unwrap();
    assert_eq!(pending(&setup).await, 0);
    assert_eq!(stream_messages(&setup.js, "ORDER").await, published + 1);
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

/// The `(causation id, correlation id)` of the `order.confirmed` rows.
async fn causes(setup: &Setup) -> Vec<(uuid::Uuid, String)> {
    confirmations(setup)
        .await
        .into_iter()
        .map(|row| (row.causation_id, row.correlation_id))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_route_applies_a_batch_in_one_call_and_one_by_one_when_it_fails() {
    let setup = setup().await;
    let behaviour = Arc::new(Behaviour::default());
    behaviour.permanent.lock().unwrap().push("bad".into());
    let batch_consumer = || {
        let router =
            shop_messaging::Router::new().on::<OrderPlaced>(shop_messaging::Route::batched());
        consumer_with(
            &setup,
            shop_messaging::ConsumerSpec::new("inventory", "ORDER", &["order.placed"]),
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

#[tokio::test(flavor = "multi_thread")]
async fn a_stopping_relay_publishes_what_is_committed_before_it_returns() {
    let setup = setup().await;
    append(&setup, &[placed("o-1"), placed("o-2")]).await;
    // Stopped before it ever looked: only the drain at shutdown publishes.
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    relay(&setup).run(shutdown).await;
    assert_eq!(stream_messages(&setup.js, "ORDER").await, 2);
    assert_eq!(pending(&setup).await, 0);
}
