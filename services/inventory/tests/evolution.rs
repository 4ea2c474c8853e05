//! Contract evolution, both directions, against the inventory service on
//! real NATS and PostgreSQL:
//! - an `order.placed` from a newer producer, with fields (one of them an
//!   enum, one inside a line) this service was not built with, is applied
//!   as before, the unknown fields ignored;
//! - today's `order.placed` read against that newer schema has the new
//!   fields at their defaults;
//! - during a migration window `shop.order.v2.OrderPlaced` goes out beside
//!   v1 on the same subject: the v1 consumer (this service) applies v1 and
//!   acks v2 as a type it does not know, and a v2 consumer applies v2 and
//!   ignores v1, each routed by `ce-type`;
//! - but a type on another type's subject (a cancellation on
//!   `order.placed`) is dead-lettered with that reason, not applied.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use pg_jetstream::envelope::publish_direct;
use pg_jetstream::{
    Context, Handler, HandlerError, Outbox, Route, Router, consumer::EventConsumer,
    envelope::OutgoingEvent, provision::ConsumerSpec,
};
use prost::Message as _;
use shop_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use shop_proto::inventory::v1::{GetProductRequest, InventoryReserved};
use shop_proto::order::v1::{OrderItem, OrderPlaced};
use shop_service::Running;
use shop_test_support::TestInfra;

const WAIT: Duration = Duration::from_secs(20);

/// A line as a newer producer writes it: gift wrapping is new.
#[derive(Clone, PartialEq, prost::Message)]
struct NewerOrderItem {
    #[prost(string, tag = "1")]
    sku: String,
    #[prost(int32, tag = "2")]
    quantity: i32,
    #[prost(bool, tag = "3")]
    gift_wrap: bool,
}

/// Where an order came from: an enum this service has never seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
enum SalesChannel {
    Unspecified = 0,
    Web = 1,
    Kiosk = 2,
}

/// `shop.order.v1.OrderPlaced` with two fields added (additive, as `buf
/// breaking` allows within v1).
#[derive(Clone, PartialEq, prost::Message)]
struct NewerOrderPlaced {
    #[prost(string, tag = "1")]
    order_id: String,
    #[prost(string, tag = "2")]
    user_id: String,
    #[prost(message, repeated, tag = "3")]
    items: Vec<NewerOrderItem>,
    #[prost(string, tag = "6")]
    gift_note: String,
    #[prost(enumeration = "SalesChannel", tag = "7")]
    channel: i32,
}

/// A breaking change, so a package of its own: `shop.order.v2.OrderPlaced`
/// counts units as int64 and names the buyer differently.
#[derive(Clone, PartialEq, prost::Message)]
struct OrderPlacedV2 {
    #[prost(string, tag = "1")]
    order_id: String,
    #[prost(string, tag = "2")]
    buyer_id: String,
    #[prost(string, tag = "3")]
    sku: String,
    #[prost(int64, tag = "4")]
    units: i64,
}

impl shop_proto::Event for OrderPlacedV2 {
    const TYPE: &'static str = "shop.order.v2.OrderPlaced";
    const SUBJECT: &'static str = "order.placed";
}

struct Inventory {
    infra: TestInfra,
    js: jetstream::Context,
    running: Running,
}

impl Inventory {
    async fn start() -> Self {
        let common::Started {
            infra, js, running, ..
        } = common::start(10).await;
        Self { infra, js, running }
    }

    async fn publish(
        &self,
        subject: &'static str,
        event_type: &'static str,
        payload: Vec<u8>,
        order_id: &str,
    ) {
        let event = OutgoingEvent {
            subject,
            event_type,
            payload,
            correlation_id: Some(order_id.to_owned()),
            causation_id: None,
        };
        publish_direct(&self.js, &event, "shop/order")
            .await
            .unwrap();
    }

    async fn reserved_lamps(&self) -> i64 {
        let mut client = InventoryServiceClient::new(shop_auth::with_token(
            self.running.channel().await.unwrap(),
            &self.infra.issuer.admin_token(),
        ));
        client
            .get_product(GetProductRequest { sku: "LAMP".into() })
            .await
            .unwrap()
            .into_inner()
            .product
            .unwrap()
            .reserved
    }

    /// The inventory.reserved events, once `expected` are published: the
    /// relay publishes a reservation a moment after its row commits.
    async fn reservations_once(&self, expected: usize) -> Vec<InventoryReserved> {
        eventually("the reservations are published", || async {
            self.reservations().await.len() >= expected
        })
        .await;
        self.reservations().await
    }

    /// The inventory.reserved events published so far.
    async fn reservations(&self) -> Vec<InventoryReserved> {
        let stream = self.js.get_stream("INVENTORY").await.unwrap();
        let messages = pg_jetstream::dead_letters::read_stream(
            &stream,
            jetstream::consumer::DeliverPolicy::All,
            |message| {
                std::ops::ControlFlow::Continue(message.subject.as_str() == "inventory.reserved")
            },
        )
        .await
        .unwrap();
        messages
            .iter()
            .map(|m| InventoryReserved::decode(m.payload.as_ref()).unwrap())
            .collect()
    }

    /// The service's count of consumed `order.placed` events with `outcome`.
    async fn consumed(&self, outcome: &str) -> u64 {
        let addr = self.running.http_addr();
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(
            &mut stream,
            b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut text = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut text)
            .await
            .unwrap();
        let wanted = format!(
            "shop_events_consumed_total{{consumer=\"inventory\",subject=\"order.placed\",outcome=\"{outcome}\"}} "
        );
        text.lines()
            .find_map(|line| line.strip_prefix(&wanted))
            .map_or(0, |n| n.trim().parse().unwrap())
    }
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + WAIT;
    while !check().await {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_with_fields_this_service_does_not_know_is_applied_as_before() {
    let inventory = Inventory::start().await;
    let order_id = uuid::Uuid::now_v7().to_string();
    let newer = NewerOrderPlaced {
        order_id: order_id.clone(),
        user_id: uuid::Uuid::now_v7().to_string(),
        items: vec![NewerOrderItem {
            sku: "LAMP".into(),
            quantity: 3,
            gift_wrap: true,
        }],
        gift_note: "happy birthday".into(),
        channel: SalesChannel::Kiosk as i32,
    };
    inventory
        .publish(
            "order.placed",
            "shop.order.v1.OrderPlaced",
            newer.encode_to_vec(),
            &order_id,
        )
        .await;
    eventually("the lamps are reserved", || async {
        inventory.reserved_lamps().await == 3
    })
    .await;
    let reservations = inventory.reservations_once(1).await;
    assert_eq!(reservations.len(), 1);
    assert_eq!(reservations[0].order_id, order_id);
    assert_eq!(reservations[0].total_cents, 3 * 1999);
    assert_eq!(inventory.consumed("ok").await, 1);
    assert_eq!(inventory.consumed("dead_lettered").await, 0);
}

#[test]
fn todays_event_read_against_a_newer_schema_has_the_new_fields_at_their_defaults() {
    let today = OrderPlaced {
        order_id: "o".into(),
        user_id: "u".into(),
        items: vec![OrderItem {
            sku: "LAMP".into(),
            quantity: 2,
        }],
        ..Default::default()
    };
    let read = NewerOrderPlaced::decode(today.encode_to_vec().as_slice()).unwrap();
    assert_eq!((read.order_id.as_str(), read.user_id.as_str()), ("o", "u"));
    assert_eq!(read.items.len(), 1);
    assert_eq!(
        (
            read.items[0].sku.as_str(),
            read.items[0].quantity,
            read.items[0].gift_wrap
        ),
        ("LAMP", 2, false)
    );
    assert_eq!(read.gift_note, "");
    assert_eq!(read.channel(), SalesChannel::Unspecified);
    // And the other way round, the fields survive a decode by today's type
    // as unknown data only: nothing of them reaches today's struct.
    let newer = NewerOrderPlaced {
        gift_note: "x".into(),
        channel: 99,
        ..read
    };
    let today_again = OrderPlaced::decode(newer.encode_to_vec().as_slice()).unwrap();
    assert_eq!(today_again.items, today.items);
}

/// The v2 events a v2 consumer was given.
#[derive(Default)]
struct Seen(Mutex<Vec<OrderPlacedV2>>);

impl Handler<OrderPlacedV2> for Seen {
    async fn handle(&self, _: &mut Context<'_>, event: OrderPlacedV2) -> Result<(), HandlerError> {
        self.0.lock().unwrap().push(event);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn v2_beside_v1_each_consumer_applies_its_own_version() {
    let inventory = Inventory::start().await;
    // A v2 consumer: another service that has moved to shop.order.v2.
    let url = inventory.infra.postgres.create_database("v2_reader").await;
    pg_jetstream::db::migrate(&url, vec![pg_jetstream::MIGRATIONS])
        .await
        .unwrap();
    let seen: Arc<Seen> = Arc::default();
    let router = Router::new().on::<OrderPlacedV2>(Route::single());
    let v2_reader = EventConsumer::new(
        inventory.js.clone(),
        pg_jetstream::db::pool(&url, 2).unwrap(),
        Outbox::new("shop/v2-reader"),
        ConsumerSpec::new("v2reader", "ORDER", &[]),
        router,
        Arc::clone(&seen),
    );
    let v2_stats = v2_reader.stats();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(v2_reader.run(shutdown.clone()));

    let (v1_order, v2_order) = (
        uuid::Uuid::now_v7().to_string(),
        uuid::Uuid::now_v7().to_string(),
    );
    let v1 = OrderPlaced {
        order_id: v1_order.clone(),
        user_id: uuid::Uuid::now_v7().to_string(),
        items: vec![OrderItem {
            sku: "LAMP".into(),
            quantity: 1,
        }],
        ..Default::default()
    };
    let v2 = OrderPlacedV2 {
        order_id: v2_order.clone(),
        buyer_id: uuid::Uuid::now_v7().to_string(),
        sku: "LAMP".into(),
        units: 4,
    };
    // The producer writes both during the window.
    inventory
        .publish(
            "order.placed",
            "shop.order.v1.OrderPlaced",
            v1.encode_to_vec(),
            &v1_order,
        )
        .await;
    inventory
        .publish(
            "order.placed",
            "shop.order.v2.OrderPlaced",
            v2.encode_to_vec(),
            &v2_order,
        )
        .await;

    eventually("the v2 consumer applied v2 and skipped v1", || async {
        v2_stats.applied.load(std::sync::atomic::Ordering::Relaxed) == 1
            && v2_stats.ignored.load(std::sync::atomic::Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(*seen.0.lock().unwrap(), [v2]);
    eventually("the v1 consumer applied v1 and skipped v2", || async {
        inventory.consumed("ok").await == 1 && inventory.consumed("ignored").await == 1
    })
    .await;
    // Only the v1 order reserved anything: v2's four units were not read
    // with v1's layout.
    assert_eq!(inventory.reserved_lamps().await, 1);
    let reservations = inventory.reservations_once(1).await;
    assert_eq!(reservations.len(), 1);
    assert_eq!(reservations[0].order_id, v1_order);
    assert_eq!(inventory.consumed("dead_lettered").await, 0);
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_on_another_types_subject_is_dead_lettered_not_applied() {
    let inventory = Inventory::start().await;
    let order_id = uuid::Uuid::now_v7().to_string();
    let placed = OrderPlaced {
        order_id: order_id.clone(),
        user_id: uuid::Uuid::now_v7().to_string(),
        items: vec![OrderItem {
            sku: "LAMP".into(),
            quantity: 2,
        }],
        ..Default::default()
    };
    inventory
        .publish(
            "order.placed",
            "shop.order.v1.OrderPlaced",
            placed.encode_to_vec(),
            &order_id,
        )
        .await;
    eventually("the lamps are reserved", || async {
        inventory.reserved_lamps().await == 2
    })
    .await;
    // A cancellation that arrives on order.placed: routing by type alone
    // would release the stock.
    let cancelled = shop_proto::order::v1::OrderCancelled {
        order_id: order_id.clone(),
        user_id: placed.user_id.clone(),
        reason: "forged".into(),
    };
    inventory
        .publish(
            "order.placed",
            "shop.order.v1.OrderCancelled",
            cancelled.encode_to_vec(),
            &order_id,
        )
        .await;
    eventually("the misplaced cancellation is dead-lettered", || async {
        inventory.consumed("dead_lettered").await == 1
    })
    .await;
    let dlq = inventory.js.get_stream("DLQ").await.unwrap();
    let letters = pg_jetstream::dead_letters::read_stream(
        &dlq,
        jetstream::consumer::DeliverPolicy::All,
        |_| std::ops::ControlFlow::Continue(true),
    )
    .await
    .unwrap();
    assert_eq!(letters.len(), 1);
    let reason = letters[0]
        .headers
        .as_ref()
        .and_then(|h| h.get(pg_jetstream::consumer::dead_letter_headers::REASON))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    assert!(
        reason.contains("belongs on order.cancelled, not on order.placed"),
        "{reason}"
    );
    assert_eq!(inventory.reserved_lamps().await, 2, "nothing was released");
    // The same cancellation on its own subject is applied.
    inventory
        .publish(
            "order.cancelled",
            "shop.order.v1.OrderCancelled",
            cancelled.encode_to_vec(),
            &order_id,
        )
        .await;
    eventually("the lamps are released", || async {
        inventory.reserved_lamps().await == 0
    })
    .await;
}
