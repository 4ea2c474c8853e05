//! `KeepPrepared` keeps statements prepared that diesel prepares afresh, and they
//! still do what they say. The session's `pg_prepared_statements` shows
//! what a connection keeps.

#![allow(clippy::unwrap_used)]

use diesel::prelude::*;
use diesel::sql_types::BigInt;
use diesel_async::{
    AsyncConnection as _, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection as _,
};
use pg_jetstream::db::KeepPrepared;
use shop_test_support::TestPostgres;

diesel::table! {
    counters (name) {
        name -> Text,
        value -> BigInt,
    }
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    count: i64,
}

/// How many statements starting with `prefix` this session keeps prepared.
async fn kept(conn: &mut AsyncPgConnection, prefix: &str) -> i64 {
    diesel::sql_query(format!(
        "SELECT count(*) AS count FROM pg_prepared_statements WHERE statement LIKE '{prefix}%'"
    ))
    .get_result::<Count>(conn)
    .await
    .unwrap()
    .count
}

async fn connect(postgres: &TestPostgres) -> AsyncPgConnection {
    let url = postgres.create_database("cached").await;
    let mut conn = AsyncPgConnection::establish(&url).await.unwrap();
    conn.batch_execute("CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL)")
        .await
        .unwrap();
    conn
}

#[tokio::test(flavor = "multi_thread")]
async fn updates_and_multi_row_inserts_are_prepared_once_per_text() {
    let postgres = TestPostgres::start().await;
    let mut conn = connect(&postgres).await;

    // A multi-row insert: one statement per row count.
    for names in [&["a", "b"][..], &["c", "d"], &["e", "f", "g"]] {
        let rows: Vec<_> = names
            .iter()
            .map(|name| (counters::name.eq(*name), counters::value.eq(0_i64)))
            .collect();
        let inserted: Vec<String> = KeepPrepared(
            diesel::insert_into(counters::table)
                .values(&rows)
                .returning(counters::name),
        )
        .get_results(&mut conn)
        .await
        .unwrap();
        assert_eq!(inserted, names.to_vec());
    }
    assert_eq!(kept(&mut conn, "INSERT").await, 2);

    // An update, three times: kept once, and applied three times.
    for _ in 0..3 {
        let updated = KeepPrepared(
            diesel::update(counters::table.find("a")).set(counters::value.eq(counters::value + 1)),
        )
        .execute(&mut conn)
        .await
        .unwrap();
        assert_eq!(updated, 1);
    }
    assert_eq!(kept(&mut conn, "UPDATE").await, 1);
    let value: i64 = counters::table
        .find("a")
        .select(counters::value)
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(value, 3);

    // The same update without the wrapper leaves nothing behind: diesel
    // prepares, runs and closes it each time.
    let mut plain = AsyncPgConnection::establish(&postgres.url("cached"))
        .await
        .unwrap();
    for _ in 0..2 {
        diesel::update(counters::table.find("b"))
            .set(counters::value.eq(counters::value + 1))
            .execute(&mut plain)
            .await
            .unwrap();
    }
    assert_eq!(kept(&mut plain, "UPDATE").await, 0);
}
