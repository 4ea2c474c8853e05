//! The inventory service alone, on free ports against a fresh database and
//! a real NATS server; the events it reacts to are published by the test.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use async_nats::jetstream;
use pg_jetstream::envelope::OutgoingEvent;
use pg_jetstream::envelope::publish_direct;
use prost::Message as _;
use shop_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use shop_proto::inventory::v1::{GetProductRequest, InventoryRejected, InventoryReserved, Product};
use shop_proto::order::v1::{OrderCancelled, OrderConfirmed, OrderItem, OrderPlaced};
use shop_service::Running;
use shop_test_support::TestInfra;

const WAIT: Duration = Duration::from_secs(20);

struct Inventory {
    infra: TestInfra,
    js: jetstream::Context,
    client: InventoryServiceClient<shop_auth::BearerChannel>,
    _running: Running,
}

impl Inventory {
    async fn start() -> Self {
        let common::Started {
            infra,
            js,
            running,
            client,
        } = common::start(3).await;
        Self {
            infra,
            js,
            client,
            _running: running,
        }
    }

    async fn publish(&self, event: OutgoingEvent) {
        publish_direct(&self.js, &event, "shop/order")
            .await
            .unwrap();
    }

    async fn lamp(&mut self) -> Product {
        self.client
            .get_product(GetProductRequest { sku: "LAMP".into() })
            .await
            .unwrap()
            .into_inner()
            .product
            .unwrap()
    }

    async fn lamp_when(&mut self, check: impl Fn(&Product) -> bool) -> Product {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let lamp = self.lamp().await;
            if check(&lamp) {
                return lamp;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the lamp never got there: {lamp:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn placed(order_id: &str, quantity: i32) -> OutgoingEvent {
    let event = OrderPlaced {
        order_id: order_id.into(),
        user_id: uuid::Uuid::now_v7().to_string(),
        items: vec![OrderItem {
            sku: "LAMP".into(),
            quantity,
        }],
        ..Default::default()
    };
    OutgoingEvent::new(&event).correlated(order_id)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_is_reserved_priced_and_then_sold() {
    let mut inventory = Inventory::start().await;
    let order_id = uuid::Uuid::now_v7().to_string();
    inventory.publish(placed(&order_id, 2)).await;

    let message = inventory
        .infra
        .nats
        .last_message("INVENTORY", "inventory.reserved", WAIT)
        .await
        .unwrap();
    let reserved = InventoryReserved::decode(message.payload.as_ref()).unwrap();
    assert_eq!(reserved.order_id, order_id);
    assert_eq!(reserved.total_cents, 2 * 1999);
    assert_eq!(
        message.headers.get("ce-correlationid").unwrap().as_str(),
        order_id
    );
    let lamp = inventory.lamp().await;
    assert_eq!((lamp.available, lamp.reserved, lamp.sold), (1, 2, 0));

    let confirmed = OrderConfirmed {
        order_id: order_id.clone(),
        user_id: reserved.user_id,
        total_cents: 2 * 1999,
    };
    inventory
        .publish(OutgoingEvent::new(&confirmed).correlated(&order_id))
        .await;
    let lamp = inventory.lamp_when(|lamp| lamp.sold == 2).await;
    assert_eq!((lamp.available, lamp.reserved, lamp.sold), (1, 0, 2));
}

#[tokio::test(flavor = "multi_thread")]
async fn too_few_units_reject_the_order_naming_the_sku() {
    let mut inventory = Inventory::start().await;
    let order_id = uuid::Uuid::now_v7().to_string();
    inventory.publish(placed(&order_id, 4)).await;
    let message = inventory
        .infra
        .nats
        .last_message("INVENTORY", "inventory.rejected", WAIT)
        .await
        .unwrap();
    let rejected = InventoryRejected::decode(message.payload.as_ref()).unwrap();
    assert_eq!(rejected.sku, "LAMP");
    assert_eq!(
        rejected.reason,
        "out of stock: LAMP has 3 available, 4 wanted"
    );
    assert_eq!(inventory.lamp().await.available, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancellation_that_overtakes_its_order_leaves_a_tombstone() {
    let mut inventory = Inventory::start().await;
    let order_id = uuid::Uuid::now_v7().to_string();
    let user_id = uuid::Uuid::now_v7().to_string();
    let cancelled = OrderCancelled {
        order_id: order_id.clone(),
        user_id,
        reason: "timeout".into(),
    };
    inventory
        .publish(OutgoingEvent::new(&cancelled).correlated(&order_id))
        .await;
    // Wait for the cancellation to be handled: the consumer's stream position passes it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    inventory.publish(placed(&order_id, 1)).await;
    // A later order goes through, so the late one has certainly been handled.
    let later = uuid::Uuid::now_v7().to_string();
    inventory.publish(placed(&later, 1)).await;
    let message = inventory
        .infra
        .nats
        .last_message("INVENTORY", "inventory.reserved", WAIT)
        .await
        .unwrap();
    let reserved = InventoryReserved::decode(message.payload.as_ref()).unwrap();
    assert_eq!(reserved.order_id, later, "the cancelled order was reserved");
    let lamp = inventory.lamp().await;
    assert_eq!((lamp.available, lamp.reserved), (2, 1));
    let stream = inventory.infra.nats.stored("INVENTORY").await;
    assert_eq!(stream, 1, "only the later order produced an event");
}
