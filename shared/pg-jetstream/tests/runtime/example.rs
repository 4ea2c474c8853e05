//! The crate's example, `examples/booking_saga.rs`, a saga of two services
//! of its own, run as it is against real servers.

use diesel::sql_types::BigInt;
use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl as _};
use shop_test_support::TestInfra;

#[allow(dead_code, unreachable_pub)]
#[path = "../../examples/booking_saga.rs"]
mod booking_saga;

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn count(url: &str, query: &str) -> i64 {
    let mut conn = AsyncPgConnection::establish(url).await.unwrap();
    let rows: Vec<Count> = diesel::sql_query(query).load(&mut conn).await.unwrap();
    rows[0].n
}

#[tokio::test(flavor = "multi_thread")]
async fn the_example_saga_sells_at_most_the_seats_the_show_has() {
    let infra = TestInfra::start().await;
    // 14 seats asked for; the show has 10.
    let requests = [3, 2, 3, 1, 3, 2];
    let ended = booking_saga::run(
        &infra.nats.url(),
        &infra.postgres.url("postgres"),
        &requests,
    )
    .await
    .unwrap();

    assert_eq!(
        ended.iter().map(|(seats, _)| *seats).collect::<Vec<_>>(),
        requests,
        "every booking ended"
    );
    let confirmed: i64 = ended
        .iter()
        .filter(|(_, status)| status == "CONFIRMED")
        .map(|(seats, _)| i64::from(*seats))
        .sum();
    assert!(confirmed <= 10, "{ended:?}");
    let left = 10 - confirmed;
    for (seats, status) in &ended {
        assert!(
            status == "CONFIRMED" || (status == "REJECTED" && i64::from(*seats) > left),
            "a booking that would have fit was rejected: {ended:?}"
        );
    }
    // The seats service's own record agrees, and both outboxes are empty.
    let seats = infra.postgres.url("seats");
    assert_eq!(
        count(&seats, "SELECT available::bigint AS n FROM shows").await,
        left
    );
    for database in ["booking", "seats"] {
        assert_eq!(
            count(
                &infra.postgres.url(database),
                "SELECT count(*) AS n FROM outbox"
            )
            .await,
            0,
            "{database}'s outbox"
        );
    }
}
