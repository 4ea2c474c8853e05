//! Shutdown in order: a service told to stop (SIGTERM) under load stops
//! taking requests and messages, finishes what it has in hand, lets its
//! events go out, and only then exits, so it leaves no unpublished row in
//! its outbox.

use shop_integration_tests::processes;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use diesel::QueryableByName;
use diesel_async::{AsyncConnection as _, AsyncPgConnection};
use processes::{ServiceProcess, place_order};
use shop_proto::order::v1::order_service_client::OrderServiceClient;
use shop_proto::order::v1::{OrderItem, PlaceOrderRequest};
use shop_proto::payment::v1::DepositRequest;
use shop_proto::payment::v1::payment_service_client::PaymentServiceClient;
use shop_test_support::{TestNats, TestPostgres};

const SERVICES: [&str; 4] = ["user", "order", "inventory", "payment"];

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    count: i64,
}

async fn count(database_url: &str, sql: &str) -> i64 {
    use diesel_async::RunQueryDsl as _;
    let mut conn = AsyncPgConnection::establish(database_url).await.unwrap();
    diesel::sql_query(sql)
        .get_result::<Count>(&mut conn)
        .await
        .unwrap()
        .count
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_stopped_under_load_leaves_nothing_in_its_outbox() {
    let (nats, postgres) = tokio::join!(TestNats::start(), TestPostgres::start());
    let mut urls = HashMap::new();
    let mut services = HashMap::new();
    for name in SERVICES {
        let url = postgres.create_database(&format!("shop_{name}")).await;
        services.insert(
            name,
            ServiceProcess::start(name, &url, &nats.url(), &[]).await,
        );
        urls.insert(name, url);
    }
    let channel = |name: &str| processes::admin_channel(services[name].endpoint());
    let user_id = processes::create_user(services["user"].endpoint(), "stop@example.com").await;
    processes::create_product(services["inventory"].endpoint(), "LAMP", 1, 1_000_000).await;
    // The wallet opens once the payment service has seen user.created.
    let mut payments = PaymentServiceClient::new(channel("payment"));
    let deposit = DepositRequest {
        user_id: user_id.clone(),
        amount_cents: 1_000_000_000,
        idempotency_key: "stop-funds".into(),
    };
    let asked = std::time::Instant::now();
    while let Err(status) = payments.deposit(deposit.clone()).await {
        assert_eq!(status.code(), tonic::Code::NotFound, "{status}");
        assert!(
            asked.elapsed() < Duration::from_secs(10),
            "no wallet: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut orders = OrderServiceClient::new(channel("order"));
    let order = PlaceOrderRequest {
        user_id: user_id.clone(),
        items: vec![OrderItem {
            sku: "LAMP".into(),
            quantity: 1,
        }],
        idempotency_key: String::new(),
    };
    // The first order waits until the order service knows the user.
    place_order(&mut orders, tonic::Request::new(order.clone())).await;

    // Sagas in flight all the time: every service commits, in its RPCs or
    // its consumers, until the moment it is told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let placed = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..8 {
        let (stop, placed, order) = (Arc::clone(&stop), Arc::clone(&placed), order.clone());
        let mut orders = orders.clone();
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // Refused once the order service stops: the load goes on.
                if orders.place_order(order.clone()).await.is_ok() {
                    placed.fetch_add(1, Ordering::Relaxed);
                } else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    let rolling = async |placed: &AtomicU64| {
        let before = placed.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(placed.load(Ordering::Relaxed) > before, "orders are placed");
    };

    // The services that consume (inventory, payment) and the one that takes
    // orders and consumes (order), one after the other, each mid-stream.
    for name in ["inventory", "payment", "order"] {
        rolling(&placed).await;
        let status = services.get_mut(name).unwrap().terminate().await;
        assert!(status.success(), "{name}-svc exits cleanly: {status}");
        // The outbox holds only rows not yet confirmed by JetStream.
        let unpublished = count(&urls[name], "SELECT count(*) AS count FROM outbox").await;
        let published = nats.stored(&name.to_uppercase()).await;
        assert_eq!(
            unpublished, 0,
            "{name}-svc left {unpublished} outbox rows unpublished ({published} published)"
        );
        assert!(
            published > 0,
            "{name}-svc published events before it stopped"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
}
