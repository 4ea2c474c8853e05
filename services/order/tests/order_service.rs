//! The order service alone, on free ports against a fresh database and a
//! real NATS server; the other services' events are published by the test.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use async_nats::jetstream;
use pg_jetstream::envelope::publish_direct;
use pg_jetstream::{envelope::OutgoingEvent, provision::StreamSpec};
use prost::Message as _;
use shop_proto::inventory::v1::InventoryRejected;
use shop_proto::order::v1::order_service_client::OrderServiceClient;
use shop_proto::order::v1::{
    GetOrderRequest, Order, OrderCancelled, OrderItem, OrderPlaced, OrderStatus, PlaceOrderRequest,
};
use shop_proto::payment::v1::PaymentCompleted;
use shop_proto::user::v1::UserCreated;
use shop_service::{Running, ServiceConfig};
use shop_test_support::TestInfra;

const WAIT: Duration = Duration::from_secs(20);

struct Orders {
    infra: TestInfra,
    js: jetstream::Context,
    client: OrderServiceClient<shop_auth::BearerChannel>,
    _running: Running,
}

impl Orders {
    async fn start(deadline: Duration) -> Self {
        let infra = TestInfra::start().await;
        let url = infra.postgres.create_database("shop_order").await;
        let config = shop_order::Config {
            service: ServiceConfig::local(url, infra.nats.url(), infra.issuer.auth_config()),
            saga_deadline_ms: deadline.as_millis() as u64,
        };
        let js = jetstream::new(infra.nats.client().await);
        for (stream, prefix) in [
            ("USER", "user"),
            ("INVENTORY", "inventory"),
            ("PAYMENT", "payment"),
        ] {
            StreamSpec::new(stream, prefix)
                .provision(&js)
                .await
                .unwrap();
        }
        let running = Running::spawn(shop_order::build(config).await.unwrap());
        let client = OrderServiceClient::new(shop_auth::with_token(
            running.channel().await.unwrap(),
            &infra.issuer.admin_token(),
        ));
        Self {
            infra,
            js,
            client,
            _running: running,
        }
    }

    fn request(user_id: &str) -> PlaceOrderRequest {
        PlaceOrderRequest {
            user_id: user_id.into(),
            items: vec![OrderItem {
                sku: "LAMP".into(),
                quantity: 2,
            }],
            idempotency_key: String::new(),
        }
    }

    /// A user the order service has learned of.
    async fn known_user(&mut self) -> String {
        let user_id = uuid::Uuid::now_v7().to_string();
        let status = self
            .client
            .place_order(Self::request(&user_id))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        let created = UserCreated {
            user_id: user_id.clone(),
            ..Default::default()
        };
        publish_direct(&self.js, &OutgoingEvent::new(&created), "shop/user")
            .await
            .unwrap();
        user_id
    }

    async fn place(&mut self, user_id: &str) -> Order {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            match self.client.place_order(Self::request(user_id)).await {
                Ok(response) => return response.into_inner().order.unwrap(),
                Err(status)
                    if status.code() == tonic::Code::FailedPrecondition
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(status) => panic!("PlaceOrder: {status}"),
            }
        }
    }

    async fn settled(&mut self, order_id: &str) -> Order {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let order = self
                .client
                .get_order(GetOrderRequest {
                    order_id: order_id.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .order
                .unwrap();
            if order.status() != OrderStatus::Pending {
                return order;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still pending: {order:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_placed_order_is_published_with_its_deadline_and_cancelled_on_rejection() {
    let mut orders = Orders::start(Duration::from_secs(30)).await;
    let user_id = orders.known_user().await;
    let order = orders.place(&user_id).await;
    assert_eq!(order.status(), OrderStatus::Pending);
    // The reply is the order as stored, to the microsecond.
    let stored = orders
        .client
        .get_order(GetOrderRequest {
            order_id: order.order_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(stored, order);

    let message = orders
        .infra
        .nats
        .last_message("ORDER", "order.placed", WAIT)
        .await
        .unwrap();
    let placed = OrderPlaced::decode(message.payload.as_ref()).unwrap();
    assert_eq!(placed.order_id, order.order_id);
    assert_eq!(placed.items, order.items);
    assert_eq!(placed.placed_at, order.created_at);
    let window = placed.deadline.unwrap().seconds - placed.placed_at.unwrap().seconds;
    assert!(
        (29..=31).contains(&window),
        "deadline {window} s after placement"
    );

    let rejected = InventoryRejected {
        order_id: order.order_id.clone(),
        user_id: user_id.clone(),
        reason: "out of stock: LAMP has 1 available, 2 wanted".into(),
        sku: "LAMP".into(),
    };
    publish_direct(
        &orders.js,
        &OutgoingEvent::new(&rejected).correlated(&order.order_id),
        "shop/inventory",
    )
    .await
    .unwrap();
    let order = orders.settled(&order.order_id).await;
    assert_eq!(order.status(), OrderStatus::Cancelled);
    assert_eq!(
        order.cancel_reason,
        "out of stock: LAMP has 1 available, 2 wanted"
    );
    let message = orders
        .infra
        .nats
        .last_message("ORDER", "order.cancelled", WAIT)
        .await
        .unwrap();
    assert_eq!(
        OrderCancelled::decode(message.payload.as_ref())
            .unwrap()
            .order_id,
        order.order_id
    );
    // The cancellation names the rejection that caused it.
    assert!(message.headers.get("ce-causationid").is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_capture_after_the_deadline_cancels_instead_of_confirming() {
    let deadline = Duration::from_secs(1);
    let mut orders = Orders::start(deadline).await;
    let user_id = orders.known_user().await;
    let order = orders.place(&user_id).await;
    // The sweeper cancels it at the deadline; the late capture changes nothing.
    let settled = orders.settled(&order.order_id).await;
    assert_eq!(settled.status(), OrderStatus::Cancelled);
    assert_eq!(settled.cancel_reason, "timeout");
    let completed = PaymentCompleted {
        order_id: order.order_id.clone(),
        user_id,
        amount_cents: 3998,
        provider: None,
    };
    publish_direct(
        &orders.js,
        &OutgoingEvent::new(&completed).correlated(&order.order_id),
        "shop/payment",
    )
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let order = orders.settled(&order.order_id).await;
        if order
            .steps
            .iter()
            .any(|step| step.name == "payment.completed")
        {
            assert_eq!(order.status(), OrderStatus::Cancelled);
            assert!(
                !order
                    .steps
                    .iter()
                    .any(|step| step.name == "order.confirmed")
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the capture was never recorded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_largest_page_of_the_largest_orders_fits_a_clients_default_limit() {
    use shop_proto::order::v1::ListOrdersRequest;
    let mut orders = Orders::start(Duration::from_secs(600)).await;
    let user_id = orders.known_user().await;
    orders.place(&user_id).await;
    // The largest order there can be: 100 lines, each SKU 64 characters of
    // four bytes each. A thousand of them would be over 25 MiB.
    let big = |n: usize| PlaceOrderRequest {
        user_id: user_id.clone(),
        items: (0..100)
            .map(|line| OrderItem {
                sku: format!("{n:04}{line:03}{}", "😀".repeat(57)),
                quantity: 1000,
            })
            .collect(),
        idempotency_key: String::new(),
    };
    let mut placed = vec![];
    for n in 0..140 {
        let order = orders
            .client
            .place_order(big(n))
            .await
            .unwrap()
            .into_inner()
            .order
            .unwrap();
        placed.push(order.order_id);
    }

    // The client's default limit (4 MiB) is left as it is: a reply past it
    // would fail to decode here.
    let mut listed = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = orders
            .client
            .list_orders(ListOrdersRequest {
                user_id: user_id.clone(),
                page_size: 1000,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.encoded_len() <= 4 * 1024 * 1024);
        for order in &page.orders {
            assert!(order.items.len() == 100 || order.items.len() == 1);
            assert!(!order.steps.is_empty(), "each order keeps its steps");
        }
        listed.extend(page.orders.into_iter().map(|order| order.order_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert!(pages >= 2, "141 of these orders do not fit one reply");
    assert_eq!(listed.len(), 141, "every order once");
    let newest_first: Vec<String> = placed.iter().rev().cloned().collect();
    assert_eq!(
        listed[..140],
        newest_first[..],
        "newest first, none skipped"
    );

    // Another user's order is not a cursor into this user's list.
    let other = orders.known_user().await;
    let theirs = orders.place(&other).await;
    let status = orders
        .client
        .list_orders(ListOrdersRequest {
            user_id,
            page_size: 10,
            page_token: theirs.order_id,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
}
