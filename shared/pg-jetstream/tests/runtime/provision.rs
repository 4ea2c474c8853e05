//! Provisioning against a real JetStream: created, then updated in place.

use std::time::Duration;

use crate::common::*;

#[tokio::test(flavor = "multi_thread")]
async fn provisioning_creates_then_updates_in_place() {
    let setup = setup().await;
    // `setup` provisioned ORDER once; a new deploy changes its settings.
    let mut spec = pg_jetstream::provision::StreamSpec::new("ORDER", "order");
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
    assert_eq!(info.max_bytes, pg_jetstream::provision::STREAM_MAX_BYTES);
    assert_eq!(info.max_message_size, 1 << 20);
    assert_eq!(
        info.discard,
        async_nats::jetstream::stream::DiscardPolicy::New
    );

    let mut consumer = pg_jetstream::provision::ConsumerSpec::new(
        "payment",
        "ORDER",
        &["order.placed", "order.cancelled"],
    );
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
