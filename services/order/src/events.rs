//! The event adapter: a routing table from event to saga step.
//!
//! | consumes | does | emits |
//! |---|---|---|
//! | `user.created` | remember the user | - |
//! | `inventory.reserved` | record the total | - |
//! | `payment.completed` | CONFIRMED (CANCELLED `timeout` if past the deadline) | `order.confirmed` (or `order.cancelled`) |
//! | `inventory.rejected`, `payment.failed` | CANCELLED with the reason | `order.cancelled` |

use shop_messaging::consumer::uuid_field as id;
use shop_messaging::{BoxFuture, Context, HandlerError, Outbox, Router};
use shop_proto::inventory::v1::{InventoryRejected, InventoryReserved};
use shop_proto::payment::v1::{PaymentCompleted, PaymentFailed};
use shop_proto::user::v1::UserCreated;

use crate::app;
use crate::domain::SagaEvent;
use crate::metrics::SagaMetrics;

/// What the handlers share: the outbox their cancellations and
/// confirmations go to.
#[derive(Debug, Clone)]
pub(crate) struct Handlers {
    pub(crate) outbox: Outbox,
    pub(crate) metrics: SagaMetrics,
}

pub(crate) fn user_events() -> Router<Handlers> {
    Router::new().on::<UserCreated, _>(on_user_created)
}

pub(crate) fn inventory_events() -> Router<Handlers> {
    Router::new()
        .on::<InventoryReserved, _>(on_inventory_reserved)
        .on::<InventoryRejected, _>(on_inventory_rejected)
}

pub(crate) fn payment_events() -> Router<Handlers> {
    Router::new()
        .on::<PaymentCompleted, _>(on_payment_completed)
        .on::<PaymentFailed, _>(on_payment_failed)
}

fn on_user_created<'a>(
    _: &'a Handlers,
    cx: &'a mut Context<'_>,
    event: UserCreated,
) -> BoxFuture<'a, Result<(), HandlerError>> {
    Box::pin(async move { app::learn_user(cx.conn(), id("user_id", &event.user_id)?).await })
}

async fn advance(
    h: &Handlers,
    cx: &mut Context<'_>,
    order_id: &str,
    event: SagaEvent,
    total: Option<i64>,
) -> Result<(), HandlerError> {
    let order_id = id("order_id", order_id)?;
    let envelope = cx.envelope().clone();
    let end = app::advance(cx.conn(), &h.outbox, &envelope, order_id, event, total).await?;
    if let Some(end) = end {
        let metrics = h.metrics.clone();
        cx.after_commit(move || metrics.ended(&end));
    }
    Ok(())
}

fn on_inventory_reserved<'a>(
    h: &'a Handlers,
    cx: &'a mut Context<'_>,
    event: InventoryReserved,
) -> BoxFuture<'a, Result<(), HandlerError>> {
    Box::pin(async move {
        advance(
            h,
            cx,
            &event.order_id,
            SagaEvent::Reserved,
            Some(event.total_cents),
        )
        .await
    })
}

fn on_inventory_rejected<'a>(
    h: &'a Handlers,
    cx: &'a mut Context<'_>,
    event: InventoryRejected,
) -> BoxFuture<'a, Result<(), HandlerError>> {
    Box::pin(async move {
        advance(
            h,
            cx,
            &event.order_id,
            SagaEvent::Rejected(event.reason),
            None,
        )
        .await
    })
}

fn on_payment_completed<'a>(
    h: &'a Handlers,
    cx: &'a mut Context<'_>,
    event: PaymentCompleted,
) -> BoxFuture<'a, Result<(), HandlerError>> {
    Box::pin(async move {
        advance(
            h,
            cx,
            &event.order_id,
            SagaEvent::PaymentCompleted,
            Some(event.amount_cents),
        )
        .await
    })
}

fn on_payment_failed<'a>(
    h: &'a Handlers,
    cx: &'a mut Context<'_>,
    event: PaymentFailed,
) -> BoxFuture<'a, Result<(), HandlerError>> {
    Box::pin(async move {
        advance(
            h,
            cx,
            &event.order_id,
            SagaEvent::PaymentFailed(event.reason),
            None,
        )
        .await
    })
}
