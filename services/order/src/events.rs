//! The event adapter: a routing table from event to saga step.
//!
//! | consumes | does | emits |
//! |---|---|---|
//! | `user.created` | remember the user | - |
//! | `inventory.reserved` | record the total | - |
//! | `payment.completed` | CONFIRMED (CANCELLED `timeout` if past the deadline) | `order.confirmed` (or `order.cancelled`) |
//! | `inventory.rejected`, `payment.failed` | CANCELLED with the reason | `order.cancelled` |

use shop_messaging::consumer::uuid_field as id;
use shop_messaging::{Batch, BoxFuture, Context, HandlerError, Router};
use shop_proto::inventory::v1::{InventoryRejected, InventoryReserved};
use shop_proto::payment::v1::{PaymentCompleted, PaymentFailed};
use shop_proto::user::v1::UserCreated;

use crate::app::{self, EndEvent, StepEvent, StepOutcome};
use crate::domain::SagaEvent;
use crate::metrics::SagaMetrics;

/// What the handlers share: the counters of ended sagas.
#[derive(Debug, Clone)]
pub(crate) struct HandlerState {
    pub(crate) metrics: SagaMetrics,
}

pub(crate) fn user_events() -> Router<HandlerState> {
    Router::new().on::<UserCreated, _>(on_user_created)
}

pub(crate) fn inventory_events() -> Router<HandlerState> {
    Router::new()
        .on_batch::<InventoryReserved, _>(|h, batch, events| {
            let progress = events
                .into_iter()
                .map(|event| (event.order_id, SagaEvent::Reserved, Some(event.total_cents)));
            Box::pin(advance(h, batch, progress.collect()))
        })
        .on_batch::<InventoryRejected, _>(|h, batch, events| {
            let progress = events
                .into_iter()
                .map(|event| (event.order_id, SagaEvent::Rejected(event.reason), None));
            Box::pin(advance(h, batch, progress.collect()))
        })
}

pub(crate) fn payment_events() -> Router<HandlerState> {
    Router::new()
        .on_batch::<PaymentCompleted, _>(|h, batch, events| {
            let progress = events.into_iter().map(|event| {
                (
                    event.order_id,
                    SagaEvent::PaymentCompleted,
                    Some(event.amount_cents),
                )
            });
            Box::pin(advance(h, batch, progress.collect()))
        })
        .on_batch::<PaymentFailed, _>(|h, batch, events| {
            let progress = events
                .into_iter()
                .map(|event| (event.order_id, SagaEvent::PaymentFailed(event.reason), None));
            Box::pin(advance(h, batch, progress.collect()))
        })
}

fn on_user_created<'a>(
    _: &'a HandlerState,
    cx: &'a mut Context<'_>,
    event: UserCreated,
) -> BoxFuture<'a, Result<(), HandlerError>> {
    Box::pin(async move { app::learn_user(cx.conn(), id("user_id", &event.user_id)?).await })
}

/// Moves the batch's orders by its events (order id, saga event, total),
/// emits what the moves emit, and counts the sagas that ended.
async fn advance(
    h: &HandlerState,
    batch: &mut Batch<'_>,
    events: Vec<(String, SagaEvent, Option<i64>)>,
) -> Result<(), HandlerError> {
    let progress = events
        .into_iter()
        .enumerate()
        .map(|(index, (order_id, event, total_cents))| {
            Ok(StepEvent {
                order_id: id("order_id", &order_id)?,
                event,
                total_cents,
                subject: batch.envelope(index).subject.clone(),
            })
        })
        .collect::<Result<Vec<_>, HandlerError>>()?;
    let advanced = app::advance(batch.conn(), &progress).await?;
    for (index, StepOutcome { emit, end }) in advanced.into_iter().enumerate() {
        match emit {
            Some(EndEvent::Confirmed(event)) => batch.emit(index, &event),
            Some(EndEvent::Cancelled(event)) => batch.emit(index, &event),
            None => {}
        }
        if let Some(end) = end {
            let metrics = h.metrics.clone();
            batch.after_commit(move || metrics.ended(&end));
        }
    }
    Ok(())
}
