//! A server setting in the database URL reaches the session: the relay's
//! pool commits without waiting for the disk this way, the others wait.

#![allow(clippy::unwrap_used)]

use diesel::sql_types::Text;
use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl as _};
use shop_test_support::TestPostgres;

#[derive(diesel::QueryableByName)]
struct Setting {
    #[diesel(sql_type = Text)]
    synchronous_commit: String,
}

async fn synchronous_commit(url: &str) -> String {
    let mut conn = AsyncPgConnection::establish(url).await.unwrap();
    let setting: Setting = diesel::sql_query("SHOW synchronous_commit")
        .get_result(&mut conn)
        .await
        .unwrap();
    setting.synchronous_commit
}

#[tokio::test(flavor = "multi_thread")]
async fn a_setting_in_the_url_reaches_the_session() {
    let postgres = TestPostgres::start().await;
    let url = postgres.create_database("shop_test").await;
    assert_eq!(synchronous_commit(&url).await, "on");
    let relay_url = pg_jetstream::db::with_setting(&url, "synchronous_commit", "off");
    assert_eq!(synchronous_commit(&relay_url).await, "off");
}
