//! The durable consumer under a running service: deleted on the server (an
//! operator's `nats consumer rm`), it is provisioned again and the events
//! published meanwhile are handled, each once.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pg_jetstream::telemetry::ConsumerLabels;
use pg_jetstream::telemetry::MessagingMetrics;
use tokio_util::sync::CancellationToken;

use crate::common::*;

/// How soon after its durable is deleted a consumer handles events again:
/// JetStream ends the open pull at once ("Consumer Deleted"); a pull lost
/// without that word shows as two missed heartbeats (10 s), and the second
/// failed pull provisions again after 0.4 s.
const BOUND: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_durable_is_provisioned_again_and_nothing_is_lost() {
    let setup = setup().await;
    let behaviour = Arc::new(Behaviour::default());
    let metrics = MessagingMetrics::default();
    let consumer = consumer(&setup, Arc::clone(&behaviour)).with_metrics(metrics.clone());
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    append(&setup, &[placed("o-1"), placed("o-2")]).await;
    relay(&setup).sweep_once().await.unwrap();
    eventually("the first events", BOUND, || async {
        effects(&setup, "o-1").await + effects(&setup, "o-2").await == 2
    })
    .await;

    setup
        .js
        .delete_consumer_from_stream("inventory", "ORDER")
        .await
        .unwrap();
    let deleted = Instant::now();
    append(&setup, &[placed("o-3"), placed("o-4")]).await;
    relay(&setup).sweep_once().await.unwrap();
    eventually("the events published after the deletion", BOUND, || async {
        effects(&setup, "o-3").await + effects(&setup, "o-4").await == 2
    })
    .await;
    eprintln!("handled again {:?} after the deletion", deleted.elapsed());

    // The new durable starts at the stream's first message: the events
    // applied before come again, and the inbox absorbs them.
    eventually("the first events, again", BOUND, || async {
        stats.duplicates.load(Ordering::Relaxed) == 2
    })
    .await;
    for order in ["o-1", "o-2", "o-3", "o-4"] {
        assert_eq!(effects(&setup, order).await, 1, "{order}");
    }
    assert_eq!(stats.applied.load(Ordering::Relaxed), 4);
    let labels = ConsumerLabels {
        consumer: "inventory".into(),
    };
    assert_eq!(metrics.consumer_up.get_or_create(&labels).get(), 1);
    assert!(
        setup
            .js
            .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
                "inventory",
                "ORDER"
            )
            .await
            .is_ok()
    );
    shutdown.cancel();
    task.await.unwrap();
}
