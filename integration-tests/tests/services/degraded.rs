//! Degraded but alive: with NATS down the shop still takes orders and
//! finishes their sagas once NATS is back; with PostgreSQL down its RPCs
//! answer UNAVAILABLE instead of hanging, and every service recovers by
//! itself when PostgreSQL returns; a row lock held for minutes by someone
//! else stalls the sagas that need it and dead-letters none of them.

use shop_integration_tests::shop;
use std::time::{Duration, Instant};

use diesel_async::{AsyncConnection as _, AsyncPgConnection, SimpleAsyncConnection as _};
use shop::{Settings, Shop};
use shop_proto::order::v1::{GetOrderRequest, OrderStatus};

#[tokio::test(flavor = "multi_thread")]
async fn orders_are_taken_while_nats_is_down_and_their_sagas_finish_after() {
    let mut shop = Shop::start(Settings::default()).await;
    let user = shop.create_user("nonats@example.com").await;
    shop.create_product("LAMP", 1999, 5).await;
    // The order service knows the user before NATS goes.
    shop.place(&user, &[("LAMP", 1)], "before").await.unwrap();

    shop.infra.nats.stop();
    let order = shop.place(&user, &[("LAMP", 2)], "during").await.unwrap();
    assert_eq!(order.status(), OrderStatus::Pending);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        shop.order(&order.order_id).await.status(),
        OrderStatus::Pending,
        "nothing moves without NATS: the events wait in the outbox"
    );

    shop.infra.nats.start_again().await;
    let order = shop.settled(&order.order_id).await;
    assert_eq!(order.status(), OrderStatus::Confirmed, "{:?}", order.steps);
    shop.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rpcs_answer_unavailable_while_postgres_is_down_and_recover_by_themselves() {
    let mut shop = Shop::start(Settings::default()).await;
    let user = shop.create_user("nopg@example.com").await;
    shop.create_product("LAMP", 1999, 5).await;
    shop.place(&user, &[("LAMP", 1)], "before").await.unwrap();

    shop.infra.postgres.stop();
    let mut orders = shop.orders().await;
    let asked = Instant::now();
    let status = orders
        .get_order(GetOrderRequest {
            order_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    // Answered, not hung: the pool gives up after its 5 s wait.
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "{:?}",
        asked.elapsed()
    );
    let status = shop
        .place(&user, &[("LAMP", 1)], "during")
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");

    // Back, with no restart of any service.
    shop.infra.postgres.start_again().await;
    let order = shop::eventually_value("PlaceOrder works again", || async {
        shop.place(&user, &[("LAMP", 1)], "after").await.ok()
    })
    .await;
    let order = shop.settled(&order.order_id).await;
    assert_eq!(order.status(), OrderStatus::Confirmed, "{:?}", order.steps);
    shop.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_lock_held_past_every_redelivery_dead_letters_nothing() {
    let ack_wait = Duration::from_secs(1);
    let mut shop = Shop::start(Settings {
        ack_wait,
        saga_deadline: Duration::from_secs(120),
        ..Settings::default()
    })
    .await;
    let user = shop.create_user("locked@example.com").await;
    shop.create_product("LAMP", 100, 50).await;
    let first = shop.place(&user, &[("LAMP", 1)], "warm").await.unwrap();
    shop.settled(&first.order_id).await;

    // A session elsewhere (a paused replica, a forgotten psql) holds the
    // product's row: every reservation of LAMP waits on it.
    let mut holder = AsyncPgConnection::establish(&shop.infra.postgres.url("shop_inventory"))
        .await
        .unwrap();
    holder
        .batch_execute("BEGIN; SELECT * FROM products WHERE sku = 'LAMP' FOR UPDATE")
        .await
        .unwrap();
    let mut stalled = Vec::new();
    for i in 0..12 {
        let order = shop
            .place(&user, &[("LAMP", 1)], &format!("stalled-{i}"))
            .await
            .unwrap();
        stalled.push(order.order_id);
    }
    // Longer than max_deliver (8) x the ack wait: before, the messages
    // fetched behind the stuck batch spent their deliveries meanwhile.
    tokio::time::sleep(ack_wait * 8 + Duration::from_secs(4)).await;
    for order_id in &stalled {
        assert_eq!(
            shop.order(order_id).await.status(),
            OrderStatus::Pending,
            "nothing moves while the lock is held"
        );
    }
    holder.batch_execute("ROLLBACK").await.unwrap();

    for order_id in &stalled {
        let order = shop.settled(order_id).await;
        assert_eq!(order.status(), OrderStatus::Confirmed, "{:?}", order.steps);
    }
    assert_eq!(
        shop.dead_letters().await,
        0,
        "a stall is nobody's messages' fault"
    );
    shop.check_invariants().await;
}
