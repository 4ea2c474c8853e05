//! The relay against real NATS and PostgreSQL: the sweep, restarts, lost
//! acks, two relays at once, a full stream, stopping.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use diesel_async::{AsyncConnection as _, AsyncPgConnection, SimpleAsyncConnection as _};
use futures::StreamExt as _;
use pg_jetstream::envelope::headers;
use pg_jetstream::outbox::Relay;
use tokio_util::sync::CancellationToken;

use crate::common::*;

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
async fn a_full_stream_refuses_new_events_which_wait_in_the_outbox() {
    let setup = setup().await;
    pg_jetstream::provision::StreamSpec::new("ORDER", "order")
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
    pg_jetstream::provision::StreamSpec::new("ORDER", "order")
        .provision(&setup.js)
        .await
        .unwrap();
    relay.sweep_once().await.unwrap();
    assert_eq!(pending(&setup).await, 0);
    assert_eq!(stream_messages(&setup.js, "ORDER").await, published + 1);
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
