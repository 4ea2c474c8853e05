//! What an operator reads with `shopctl saga` and `shopctl dlq`, against the
//! four services in-process on a real nats-server and PostgreSQL.

use shop_integration_tests::shop;
use std::time::Duration;

use async_nats::jetstream;
use pg_jetstream::envelope::publish_direct;
use pg_jetstream::{dead_letters::DeadLetters, envelope::OutgoingEvent};
use shop::{Settings, Shop};
use shop_proto::order::v1::{OrderItem, OrderPlaced, OrderStatus};
use shopctl::timeline::{Outcome, Timeline};
use uuid::Uuid;

const WINDOW: Duration = Duration::from_secs(600);

async fn read(js: &jetstream::Context, order_id: &str) -> Timeline {
    Timeline::read(js, order_id.parse().unwrap(), WINDOW)
        .await
        .unwrap()
}

/// The saga's steps as `service subject`, waiting until there are `count`.
async fn steps(js: &jetstream::Context, order_id: &str, count: usize) -> Vec<String> {
    shop::eventually_value("the saga's steps", || async {
        let timeline = read(js, order_id).await;
        (timeline.steps.len() >= count).then(|| {
            timeline
                .steps
                .iter()
                .map(|step| match &step.dead_letter {
                    None => format!("{} {}", step.service, step.subject),
                    Some(letter) => format!("dead letter of {} {}", letter.consumer, step.subject),
                })
                .collect()
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timeline_shows_each_saga_across_the_services_in_order() {
    // The span layer a local stack runs with, so that events carry their
    // trace context (nothing is exported without an OTLP endpoint).
    let _telemetry = shop_service::init_logs("test", shop_service::LogFormat::Text);
    let mut shop = Shop::start(Settings::default()).await;
    let js = jetstream::new(shop.infra.nats.client().await);
    let user = shop.create_user("tim@example.com").await;
    shop.create_product("LAMP", 1999, 5).await;
    shop.create_product("YACHT", 50_000_000, 1).await;

    let confirmed = shop.place(&user, &[("LAMP", 2)], "").await.unwrap();
    let declined = shop.place(&user, &[("YACHT", 1)], "").await.unwrap();
    assert_eq!(
        shop.settled(&confirmed.order_id).await.status(),
        OrderStatus::Confirmed
    );
    assert_eq!(
        shop.settled(&declined.order_id).await.status(),
        OrderStatus::Cancelled
    );

    assert_eq!(
        steps(&js, &confirmed.order_id, 4).await,
        [
            "order order.placed",
            "inventory inventory.reserved",
            "payment payment.completed",
            "order order.confirmed",
        ]
    );
    let timeline = read(&js, &confirmed.order_id).await;
    assert_eq!(timeline.outcome(), Outcome::Confirmed);
    // One trace for the whole saga, which Jaeger finds by its id.
    let trace = timeline.trace_id().expect("the saga's trace id");
    assert_eq!(trace.len(), 32, "{trace}");
    assert!(
        timeline
            .steps
            .iter()
            .all(|step| step.trace_id.as_deref() == Some(trace)),
        "{:?}",
        timeline.steps
    );
    assert_eq!(
        timeline.steps[0].detail,
        format!("2 x LAMP for user {user}")
    );
    assert_eq!(timeline.steps[1].detail, "2 x LAMP, total 3998 cents");

    // Inventory releases on `payment.failed`; nothing was captured, so
    // nothing is refunded.
    let mut declined_steps = steps(&js, &declined.order_id, 5).await;
    declined_steps[3..].sort();
    assert_eq!(
        declined_steps,
        [
            "order order.placed",
            "inventory inventory.reserved",
            "payment payment.failed",
            "inventory inventory.released",
            "order order.cancelled",
        ]
    );
    let timeline = read(&js, &declined.order_id).await;
    assert!(
        matches!(&timeline.outcome(), Outcome::Cancelled(detail) if detail.starts_with("reason: insufficient funds")),
        "{:?}",
        timeline.outcome()
    );
    assert_eq!(timeline.dead_letters().count(), 0);
    shop.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_saga_stopped_by_a_poison_event_shows_the_dead_letter_and_why() {
    let shop = Shop::start(Settings::default()).await;
    let js = jetstream::new(shop.infra.nats.client().await);
    // An event no inventory can act on: its user id is not a UUID.
    let order_id = Uuid::now_v7().to_string();
    let poison = OutgoingEvent::new(&OrderPlaced {
        order_id: order_id.clone(),
        user_id: "nobody".into(),
        items: vec![OrderItem {
            sku: "LAMP".into(),
            quantity: 1,
        }],
        ..Default::default()
    })
    .correlated(&order_id);
    publish_direct(&js, &poison, "shop/order").await.unwrap();

    assert_eq!(
        steps(&js, &order_id, 2).await,
        [
            "order order.placed",
            "dead letter of inventory order.placed"
        ]
    );
    let timeline = read(&js, &order_id).await;
    assert_eq!(
        timeline.outcome(),
        Outcome::NotEnded(Some("order.placed".into()))
    );
    let letter = timeline.dead_letters().next().unwrap();
    assert_eq!(letter.reason, "user_id is not a UUID: \"nobody\"");

    // Replayed to inventory, which still cannot act on it: a second dead
    // letter, and the first is gone from the queue.
    let queue = DeadLetters::open(js.clone()).await.unwrap();
    queue.replay(letter.sequence).await.unwrap();
    assert_eq!(
        steps(&js, &order_id, 2).await.last().unwrap(),
        "dead letter of inventory order.placed"
    );
    shop::eventually("the replay dead-lettered again", || async {
        let letters = queue.list().await.unwrap();
        letters.len() == 1 && letters[0].sequence != letter.sequence
    })
    .await;
    let again = queue.list().await.unwrap().remove(0);
    assert_eq!(again.consumer, "inventory");
    assert_eq!(again.stream, "REPLAY");
    queue.delete(again.sequence).await.unwrap();
    assert_eq!(read(&js, &order_id).await.dead_letters().count(), 0);
    shop.check_invariants().await;
}
