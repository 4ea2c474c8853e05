//! `Messaging::builder`: what it refuses at start, and the names it is
//! configured with, followed by every part it sets up.

use std::sync::Arc;

use pg_jetstream::dead_letters::DeadLetters;
use pg_jetstream::envelope::publish_direct;
use pg_jetstream::provision::Names;
use pg_jetstream::{Config, Messaging, Route, Router, StartError};
use shop_test_support::TestInfra;
use tokio_util::sync::CancellationToken;

use crate::common::{Behaviour, WAIT, effects, eventually, placed, setup, stream_messages};
use crate::events::OrderPlaced;

#[tokio::test(flavor = "multi_thread")]
async fn a_database_without_the_runtime_tables_is_refused_before_anything_is_made() {
    let infra = TestInfra::start().await;
    let url = infra.postgres.create_database("bare").await;
    let js = async_nats::jetstream::new(infra.nats.client().await);
    let started = Messaging::builder(
        js.clone(),
        pg_jetstream::db::pool(&url, 2).unwrap(),
        Config::new("billing"),
    )
    .consume("ORDER", Router::new().on::<OrderPlaced>(Route::single()))
    .start(Arc::new(Behaviour::default()))
    .await;
    match started {
        Err(StartError::Migrations(pending)) => assert_eq!(
            pending.len(),
            diesel::migration::MigrationSource::<diesel::pg::Pg>::migrations(
                &pg_jetstream::MIGRATIONS
            )
            .unwrap()
            .len()
        ),
        other => panic!("started on a bare database: {other:?}"),
    }
    assert!(
        js.get_stream("BILLING").await.is_err(),
        "no stream is made for a service that cannot start"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_and_their_replays_go_where_the_configured_names_say() {
    let setup = setup().await;
    let names = Names {
        dead_letter_stream: "TRAVEL_DLQ".into(),
        dead_letter_prefix: "travel-dlq".into(),
        replay_stream: "TRAVEL_REPLAY".into(),
        replay_prefix: "travel-replay".into(),
    };
    let mut config = Config::new("billing");
    config.names = names.clone();
    config.source = "travel/billing".into();
    let behaviour = Arc::new(Behaviour::default());
    behaviour.permanent.lock().unwrap().push("o-1".into());
    let messaging = Messaging::builder(setup.js.clone(), setup.pool.clone(), config)
        .consume("ORDER", Router::new().on::<OrderPlaced>(Route::single()))
        .start(Arc::clone(&behaviour))
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(messaging.run(shutdown.clone()));

    publish_direct(&setup.js, &placed("o-1"), "example/order")
        .await
        .unwrap();
    eventually("a dead letter in TRAVEL_DLQ", WAIT, || async {
        stream_messages(&setup.js, "TRAVEL_DLQ").await == 1
    })
    .await;
    let queue = DeadLetters::open_named(setup.js.clone(), names)
        .await
        .unwrap();
    let letters = queue.list().await.unwrap();
    let stored = setup
        .js
        .get_stream("TRAVEL_DLQ")
        .await
        .unwrap()
        .get_raw_message(letters[0].sequence)
        .await
        .unwrap();
    assert_eq!(stored.subject.as_str(), "travel-dlq.billing.order.placed");
    assert_eq!(letters[0].consumer, "billing");

    // Replayed to the consumer that gave up, through the replay stream
    // the names give, and applied once the handler takes it.
    behaviour.permanent.lock().unwrap().clear();
    queue.replay(letters[0].sequence).await.unwrap();
    eventually("the replay applied", WAIT, || async {
        effects(&setup, "o-1").await == 1
    })
    .await;
    assert_eq!(stream_messages(&setup.js, "TRAVEL_REPLAY").await, 1);
    assert_eq!(stream_messages(&setup.js, "TRAVEL_DLQ").await, 0);
    // The default streams saw nothing.
    assert_eq!(stream_messages(&setup.js, "DLQ").await, 0);
    assert_eq!(stream_messages(&setup.js, "REPLAY").await, 0);
    shutdown.cancel();
    running.await.unwrap();
}
