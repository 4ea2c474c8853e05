//! A server that answers in German. The failures the classifier tells by
//! their messages (deadlocks, lock timeouts) would read as bugs there, so a
//! service's sessions are made to speak English, or it refuses to start,
//! and the runtime's pools refuse a session they cannot make English;
//! once they do, deadlocks and lock timeouts are contention again.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use diesel_async::{AsyncConnection as _, AsyncPgConnection, SimpleAsyncConnection as _};
use pg_jetstream::db::{Failure, SessionLimits};
use shop_test_support::TestPostgres;

/// A deadlock and a lock timeout, as sessions of `url` meet them.
async fn deadlock_and_lock_timeout(url: &str) -> (diesel::result::Error, diesel::result::Error) {
    let pool = pg_jetstream::db::pool(url, 2).unwrap();
    let (mut a, mut b) = (pool.get().await.unwrap(), pool.get().await.unwrap());
    a.batch_execute("BEGIN; UPDATE rows SET id = id WHERE id = 1")
        .await
        .unwrap();
    b.batch_execute("BEGIN; UPDATE rows SET id = id WHERE id = 2")
        .await
        .unwrap();
    let (first, second) = tokio::join!(
        a.batch_execute("UPDATE rows SET id = id WHERE id = 2"),
        b.batch_execute("UPDATE rows SET id = id WHERE id = 1"),
    );
    let deadlock = first.err().or(second.err()).expect("one of them is chosen");
    a.batch_execute("ROLLBACK").await.unwrap();
    b.batch_execute("ROLLBACK").await.unwrap();

    let short = SessionLimits {
        lock_timeout: Duration::from_millis(200),
        ..SessionLimits::default()
    };
    let pool = pg_jetstream::db::pool_with_limits(url, 1, &short).unwrap();
    a.batch_execute("BEGIN; SELECT * FROM rows WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    let timeout = pool
        .get()
        .await
        .unwrap()
        .batch_execute("SELECT * FROM rows WHERE id = 1 FOR UPDATE")
        .await
        .unwrap_err();
    a.batch_execute("ROLLBACK").await.unwrap();
    (deadlock, timeout)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_answering_in_german_is_made_to_speak_english_or_refused() {
    let postgres = TestPostgres::start().await;
    let url = postgres.create_database("german").await;
    let mut admin = AsyncPgConnection::establish(&url).await.unwrap();
    admin
        .batch_execute(
            "CREATE TABLE rows (id INT PRIMARY KEY); INSERT INTO rows VALUES (1), (2);
             CREATE ROLE app LOGIN; GRANT SELECT, UPDATE ON rows TO app",
        )
        .await
        .unwrap();
    admin
        .batch_execute("ALTER DATABASE german SET lc_messages TO 'de_DE.UTF-8'")
        .await
        .expect("the de_DE.UTF-8 locale (scripts/bootstrap makes it)");
    let app = format!("postgres://app@127.0.0.1:{}/german", postgres.port());

    // What the classifier would meet on a session left as it is: German,
    // read as a bug.
    let mut holder = AsyncPgConnection::establish(&app).await.unwrap();
    holder
        .batch_execute("BEGIN; SELECT * FROM rows WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    let mut raw = AsyncPgConnection::establish(&app).await.unwrap();
    let timeout = raw
        .batch_execute("SET lock_timeout = 200; SELECT * FROM rows WHERE id = 1 FOR UPDATE")
        .await
        .unwrap_err();
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert!(timeout.to_string().contains("Sperre"), "{timeout}");
    assert_eq!(Failure::of(&timeout), Failure::Other, "{timeout}");

    // The runtime's pools never hand out such a session: refused, saying
    // how to fix it.
    let refused = match pg_jetstream::db::pool(&app, 1).unwrap().get().await {
        Ok(_) => panic!("a pool handed out a session that answers in German"),
        Err(error) => error.to_string(),
    };
    assert!(
        refused.contains("ALTER ROLE <this role> SET lc_messages TO 'C'"),
        "{refused}"
    );

    // A role that may not set its language: refused, saying how to fix it.
    let refused = pg_jetstream::db::english_messages(&app).await.unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("ALTER ROLE <this role> SET lc_messages TO 'C'"),
        "{refused}"
    );

    // The fix it names: the role's sessions speak English, nothing else
    // is needed, and a deadlock and a lock timeout are contention.
    admin
        .batch_execute("ALTER ROLE app SET lc_messages TO 'C'")
        .await
        .unwrap();
    assert_eq!(pg_jetstream::db::english_messages(&app).await.unwrap(), app);
    let (deadlock, timeout) = deadlock_and_lock_timeout(&app).await;
    assert_eq!(Failure::of(&deadlock), Failure::Contention, "{deadlock}");
    assert_eq!(Failure::of(&timeout), Failure::Contention, "{timeout}");

    // A role that may set it (the superuser) has every session set so:
    // through the URL english_messages gives, and by the pools themselves
    // on the URL as it was.
    let forced = pg_jetstream::db::english_messages(&url).await.unwrap();
    assert!(forced.contains("lc_messages"), "{forced}");
    for url in [&forced, &url] {
        let (deadlock, timeout) = deadlock_and_lock_timeout(url).await;
        assert_eq!(Failure::of(&deadlock), Failure::Contention, "{deadlock}");
        assert_eq!(Failure::of(&timeout), Failure::Contention, "{timeout}");
    }
}
