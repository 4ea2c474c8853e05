//! `connect` waits for a database that cannot be reached yet, as the
//! deployment's migration step needs when its stack starts together, and
//! gives up at once on anything else.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use diesel_async::SimpleAsyncConnection as _;
use shop_test_support::TestPostgres;

#[tokio::test(flavor = "multi_thread")]
async fn a_database_that_is_down_is_waited_for() {
    let mut postgres = TestPostgres::start().await;
    let url = postgres.create_database("connect").await;
    postgres.stop();

    let waiting = tokio::spawn({
        let url = url.clone();
        async move { pg_jetstream::db::connect(&url, Duration::from_secs(60)).await }
    });
    // Nothing listens meanwhile: a single attempt would have failed by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !waiting.is_finished(),
        "connect gave up on a database that is down"
    );

    postgres.start_again().await;
    let mut connection = waiting.await.unwrap().unwrap();
    connection.batch_execute("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_that_stays_down_is_given_up_on_after_the_patience() {
    let mut postgres = TestPostgres::start().await;
    let url = postgres.create_database("connect").await;
    postgres.stop();

    let error = pg_jetstream::db::connect(&url, Duration::from_secs(1))
        .await
        .err()
        .unwrap();
    assert!(error.is_unreachable(), "{error}");
    assert!(
        error.to_string().contains("cannot connect to the database"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_login_ends_it_at_once() {
    let postgres = TestPostgres::start().await;
    postgres.create_database("connect").await;
    let url = postgres.local_url("nobody_here", "connect");

    // Were the refusal taken for a database not up yet, this would wait
    // out the whole minute.
    let error = tokio::time::timeout(
        Duration::from_secs(20),
        pg_jetstream::db::connect(&url, Duration::from_secs(60)),
    )
    .await
    .expect("a refused login was tried again")
    .err()
    .unwrap();
    assert!(!error.is_unreachable(), "{error}");
    assert!(error.to_string().contains("nobody_here"), "{error}");
}
