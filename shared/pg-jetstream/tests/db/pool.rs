//! The pool hands out the connection returned last, so that at low load one
//! session (one server process, its caches warm) does the work instead of
//! every pooled session in turn.

#![allow(clippy::unwrap_used)]

use diesel::QueryableByName;
use diesel::sql_types::Integer;
use diesel_async::{AsyncPgConnection, RunQueryDsl as _};
use shop_test_support::TestPostgres;

#[derive(QueryableByName)]
struct Backend {
    #[diesel(sql_type = Integer)]
    pid: i32,
}

async fn backend(conn: &mut AsyncPgConnection) -> i32 {
    diesel::sql_query("SELECT pg_backend_pid() AS pid")
        .get_result::<Backend>(conn)
        .await
        .unwrap()
        .pid
}

#[tokio::test(flavor = "multi_thread")]
async fn the_connection_returned_last_goes_out_first() {
    let postgres = TestPostgres::start().await;
    let url = postgres.create_database("pool").await;
    let pool = pg_jetstream::db::pool(&url, 3).unwrap();

    // Three sessions open, returned oldest first.
    let mut first = pool.get().await.unwrap();
    let mut second = pool.get().await.unwrap();
    let mut third = pool.get().await.unwrap();
    let pids = [
        backend(&mut first).await,
        backend(&mut second).await,
        backend(&mut third).await,
    ];
    drop(first);
    drop(second);
    drop(third);

    // One caller at a time gets the same session every time.
    for _ in 0..5 {
        let mut conn = pool.get().await.unwrap();
        assert_eq!(backend(&mut conn).await, pids[2]);
    }
    // Two at once: the last two returned, the idle one left idle.
    let mut a = pool.get().await.unwrap();
    let mut b = pool.get().await.unwrap();
    assert_eq!(backend(&mut a).await, pids[2]);
    assert_eq!(backend(&mut b).await, pids[1]);
}
