//! The use cases against a real PostgreSQL.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{Nullable, Text};
use diesel_async::RunQueryDsl;
use pg_jetstream::db::PgPool;
use pg_jetstream::{HandlerError, Outbox, consumer::Carried};
use shop_service::{ApiError, Caller};
use shop_test_support::TestPostgres;
use uuid::Uuid;

use super::*;
use crate::domain::{SagaEvent, Status};
use crate::metrics::SagaMetrics;
use crate::schema::{order_items, order_steps, orders};

fn admin() -> Caller {
    Caller::new("admin", vec![shop_service::roles::ADMIN.into()])
}

fn step_event(order_id: Uuid, event: SagaEvent, total_cents: Option<i64>) -> StepEvent {
    let subject = match &event {
        SagaEvent::Reserved => "inventory.reserved",
        SagaEvent::Rejected(_) => "inventory.rejected",
        SagaEvent::PaymentCompleted => "payment.completed",
        SagaEvent::PaymentFailed(_) => "payment.failed",
        SagaEvent::DeadlinePassed => "deadline",
    };
    StepEvent {
        order_id,
        event,
        total_cents,
        subject: subject.into(),
    }
}

/// The saga step as its handler runs it, carrying nothing.
async fn advance_and_write(
    conn: &mut diesel_async::AsyncPgConnection,
    events: &[StepEvent],
) -> Result<Vec<StepOutcome>, HandlerError> {
    let mut advanced = advance(conn, events).await?;
    if advanced.change() {
        write_advance(conn, &advanced, &Carried::nothing()).await?;
    }
    Ok(std::mem::take(&mut advanced.outcomes))
}

/// A migrated order database, its pool and the use cases on it.
async fn order_database() -> (TestPostgres, PgPool, Orders) {
    let postgres = TestPostgres::start().await;
    let url = postgres.create_database("orders").await;
    pg_jetstream::db::migrate(&url, vec![pg_jetstream::MIGRATIONS, crate::MIGRATIONS])
        .await
        .unwrap();
    let pool = pg_jetstream::db::pool(&url, 2).unwrap();
    let orders = Orders::new(
        pool.clone(),
        Outbox::new("shop/order"),
        Duration::from_secs(60),
        SagaMetrics::default(),
    );
    (postgres, pool, orders)
}

/// Several events in one call move their orders as they would one
/// after another: a later event sees what an earlier one did.
#[tokio::test(flavor = "multi_thread")]
async fn events_advanced_together_move_each_order_in_turn() {
    let (_postgres, pool, orders) = order_database().await;
    let mut conn = pool.get().await.unwrap();
    let user_id = Uuid::now_v7();
    learn_user(&mut conn, user_id).await.unwrap();
    let items = [("LAMP".to_owned(), 1)];
    let ann = orders
        .place_order(&admin(), user_id, &items, "")
        .await
        .unwrap();
    let bob = orders
        .place_order(&admin(), user_id, &items, "")
        .await
        .unwrap();
    let (ann, bob) = (ann.order_id, bob.order_id);

    let events = [
        step_event(ann, SagaEvent::Reserved, Some(1999)),
        step_event(bob, SagaEvent::Reserved, Some(500)),
        step_event(ann, SagaEvent::PaymentCompleted, Some(1999)),
        step_event(bob, SagaEvent::PaymentFailed("no money".into()), None),
        // Too late: the order is confirmed already.
        step_event(ann, SagaEvent::PaymentFailed("late".into()), None),
    ];
    let advanced = advance_and_write(&mut conn, &events).await.unwrap();
    let summary: Vec<String> = advanced
        .iter()
        .map(|advanced| match (&advanced.emit, &advanced.end) {
            (Some(EndEvent::Confirmed(event)), Some(end)) => {
                format!("{} {}", end.outcome, event.total_cents)
            }
            (Some(EndEvent::Cancelled(event)), Some(end)) => {
                format!("{} {}", end.outcome, event.reason)
            }
            (None, None) => "recorded".into(),
            _ => "inconsistent".into(),
        })
        .collect();
    assert_eq!(
        summary,
        [
            "recorded",
            "recorded",
            "confirmed 1999",
            "cancelled no money",
            "recorded"
        ]
    );
    let ann = orders.load_order(ann).await.unwrap();
    assert_eq!(
        (
            ann.status.as_str(),
            ann.total_cents,
            ann.cancel_reason.as_str()
        ),
        ("CONFIRMED", 1999, "")
    );
    let steps: Vec<&str> = ann.steps.iter().map(|step| step.name.as_str()).collect();
    assert_eq!(
        steps,
        [
            "order.placed",
            "inventory.reserved",
            "payment.completed",
            "order.confirmed",
            "payment.failed"
        ]
    );
    let bob = orders.load_order(bob).await.unwrap();
    assert_eq!(
        (
            bob.status.as_str(),
            bob.total_cents,
            bob.cancel_reason.as_str()
        ),
        ("CANCELLED", 500, "no money")
    );
    let steps: Vec<(&str, &str)> = bob
        .steps
        .iter()
        .map(|step| (step.name.as_str(), step.detail.as_str()))
        .collect();
    assert_eq!(
        steps,
        [
            ("order.placed", ""),
            ("inventory.reserved", ""),
            ("payment.failed", "no money"),
            ("order.cancelled", "no money")
        ]
    );
    // An event for an order that does not exist fails the call.
    let error = advance_and_write(
        &mut conn,
        &[step_event(Uuid::now_v7(), SagaEvent::Reserved, None)],
    )
    .await
    .err()
    .unwrap();
    assert!(matches!(error, HandlerError::Permanent(_)), "{error}");
}

/// The saga step reads its orders without locks: a move whose order
/// changed before its statement ran (the deadline, a cancellation) is
/// refused whole, as a serialization failure (the consumer reads and
/// decides again), and records no step.
#[tokio::test(flavor = "multi_thread")]
async fn a_move_decided_on_an_order_changed_since_writes_nothing() {
    let (_postgres, pool, orders) = order_database().await;
    let mut conn = pool.get().await.unwrap();
    let user_id = Uuid::now_v7();
    learn_user(&mut conn, user_id).await.unwrap();
    let placed = orders
        .place_order(&admin(), user_id, &[("LAMP".to_owned(), 1)], "")
        .await
        .unwrap();
    let decided = advance(
        &mut conn,
        &[step_event(
            placed.order_id,
            SagaEvent::PaymentCompleted,
            Some(1999),
        )],
    )
    .await
    .unwrap();
    diesel::update(orders::table.find(placed.order_id))
        .set(orders::status.eq(Status::Cancelled.as_str()))
        .execute(&mut conn)
        .await
        .unwrap();
    let error = write_advance(&mut conn, &decided, &Carried::nothing())
        .await
        .unwrap_err();
    assert!(error.is_stale(), "{error}");
    let order = orders.load_order(placed.order_id).await.unwrap();
    assert_eq!(order.status.as_str(), "CANCELLED");
    let steps: Vec<&str> = order.steps.iter().map(|step| step.name.as_str()).collect();
    assert_eq!(steps, ["order.placed"]);
}

/// PlaceOrder's one statement writes the order, its lines, its first
/// step and its event together, or nothing at all.
#[tokio::test(flavor = "multi_thread")]
async fn an_order_is_placed_with_its_event_or_not_at_all() {
    let (_postgres, pool, orders) = order_database().await;
    #[derive(QueryableByName, Debug, Clone, PartialEq)]
    struct Written {
        #[diesel(sql_type = Text)]
        event_type: String,
        #[diesel(sql_type = Text)]
        source: String,
        #[diesel(sql_type = Nullable<Text>)]
        correlation_id: Option<String>,
    }
    let written = async || -> (i64, i64, i64, Vec<Written>) {
        let mut conn = pool.get().await.unwrap();
        let orders: i64 = orders::table.count().get_result(&mut conn).await.unwrap();
        let items: i64 = order_items::table
            .count()
            .get_result(&mut conn)
            .await
            .unwrap();
        let steps: i64 = order_steps::table
            .count()
            .get_result(&mut conn)
            .await
            .unwrap();
        let events =
            diesel::sql_query("SELECT event_type, source, correlation_id FROM outbox ORDER BY seq")
                .load(&mut conn)
                .await
                .unwrap();
        (orders, items, steps, events)
    };
    let user_id = Uuid::now_v7();
    let items = [("LAMP".to_owned(), 2), ("DESK".to_owned(), 1)];

    let error = orders
        .place_order(&admin(), user_id, &items, "k1")
        .await
        .err()
        .unwrap();
    assert!(
        matches!(error, ApiError::FailedPrecondition(_)),
        "{error:?}"
    );
    assert_eq!(
        written().await,
        (0, 0, 0, vec![]),
        "an unknown user's order writes nothing"
    );

    learn_user(&mut pool.get().await.unwrap(), user_id)
        .await
        .unwrap();
    let order = orders
        .place_order(&admin(), user_id, &items, "k1")
        .await
        .unwrap();
    let order_id = order.order_id;
    let event = Written {
        event_type: "shop.order.v1.OrderPlaced".into(),
        source: "shop/order".into(),
        correlation_id: Some(order_id.to_string()),
    };
    assert_eq!(written().await, (1, 2, 1, vec![event.clone()]));
    let stored = orders.load_order(order_id).await.unwrap();
    assert_eq!(stored.status, Status::Pending);
    assert_eq!(stored.created_at, order.created_at);
    assert_eq!(
        stored.items,
        [("DESK".to_owned(), 1), ("LAMP".to_owned(), 2)]
    );
    assert_eq!(stored.steps.len(), 1);
    assert_eq!(stored.steps[0].occurred_at, order.created_at);

    // The same key and items: the first order, and nothing more written.
    let again = orders
        .place_order(&admin(), user_id, &items, "k1")
        .await
        .unwrap();
    assert_eq!(again.order_id, order_id);
    assert_eq!(again.items, stored.items);
    assert_eq!(written().await, (1, 2, 1, vec![event.clone()]));
    // The same key for other items: refused, and nothing written.
    let other_items = orders
        .place_order(&admin(), user_id, &[("LAMP".to_owned(), 9)], "k1")
        .await
        .unwrap_err();
    assert!(
        matches!(&other_items, ApiError::FailedPrecondition(message) if message.contains(&order_id.to_string())),
        "{other_items:?}"
    );
    assert_eq!(written().await, (1, 2, 1, vec![event.clone()]));
    // No key: never deduplicated.
    let other = orders
        .place_order(&admin(), user_id, &items, "")
        .await
        .unwrap();
    assert_ne!(other.order_id, order_id);
    assert_eq!(written().await.0, 2);
}
