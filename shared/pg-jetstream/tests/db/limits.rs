//! Every pooled session has a bound on each wait: a lock held elsewhere
//! fails the waiting statement after the lock timeout, a session idle in
//! its transaction is ended by the server (its locks released), and the
//! settings are the session's own on a real PostgreSQL.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use diesel::QueryableByName;
use diesel::sql_types::Text;
use diesel_async::{
    AsyncConnection as _, AsyncPgConnection, RunQueryDsl as _, SimpleAsyncConnection as _,
};
use pg_jetstream::db::SessionLimits;
use shop_test_support::TestPostgres;

#[derive(QueryableByName)]
struct Setting {
    #[diesel(sql_type = Text)]
    setting: String,
}

async fn show(conn: &mut AsyncPgConnection, name: &str) -> String {
    diesel::sql_query(format!("SELECT current_setting('{name}') AS setting"))
        .get_result::<Setting>(conn)
        .await
        .unwrap()
        .setting
}

const SHORT: SessionLimits = SessionLimits {
    statement_timeout: Duration::from_secs(3),
    lock_timeout: Duration::from_millis(300),
    idle_in_transaction_timeout: Duration::from_millis(500),
    keepalive_idle: Duration::from_secs(20),
};

#[tokio::test(flavor = "multi_thread")]
async fn pooled_sessions_wait_a_bounded_time_for_locks_and_transactions() {
    let postgres = TestPostgres::start().await;
    let url = postgres.create_database("limits").await;
    let mut holder = AsyncPgConnection::establish(&url).await.unwrap();
    holder
        .batch_execute("CREATE TABLE rows (id INT PRIMARY KEY); INSERT INTO rows VALUES (1)")
        .await
        .unwrap();

    // The defaults, as the server sees them.
    let pool = pg_jetstream::db::pool(&url, 2).unwrap();
    let mut conn = pool.get().await.unwrap();
    assert_eq!(show(&mut conn, "statement_timeout").await, "30s");
    assert_eq!(show(&mut conn, "lock_timeout").await, "5s");
    assert_eq!(
        show(&mut conn, "idle_in_transaction_session_timeout").await,
        "1min"
    );
    assert_eq!(show(&mut conn, "tcp_keepalives_idle").await, "30");
    drop(conn);

    // Someone else holds the row: the pooled session gives up on it.
    let pool = pg_jetstream::db::pool_with_limits(&url, 2, &SHORT).unwrap();
    holder
        .batch_execute("BEGIN; SELECT * FROM rows WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    let mut conn = pool.get().await.unwrap();
    let asked = Instant::now();
    let error = conn
        .batch_execute("SELECT * FROM rows WHERE id = 1 FOR UPDATE")
        .await
        .unwrap_err();
    assert!(error.to_string().contains("lock timeout"), "{error}");
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    holder.batch_execute("ROLLBACK").await.unwrap();

    // A pooled session left idle in its transaction is ended, and the lock
    // it took goes with it.
    conn.batch_execute("BEGIN; SELECT * FROM rows WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    holder
        .batch_execute("SET lock_timeout = '1s'; SELECT * FROM rows WHERE id = 1 FOR UPDATE")
        .await
        .expect("the idle transaction's lock is gone");
    assert!(conn.batch_execute("SELECT 1").await.is_err());
}
