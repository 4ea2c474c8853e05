//! The event adapter: a routing table from event to saga step.
//!
//! | consumes | does | emits |
//! |---|---|---|
//! | `user.created` | remember the user | - |
//! | `inventory.reserved` | record the total | - |
//! | `payment.completed` | CONFIRMED (CANCELLED `timeout` if past the deadline) | `order.confirmed` (or `order.cancelled`) |
//! | `inventory.rejected`, `payment.failed` | CANCELLED with the reason | `order.cancelled` |

use pg_jetstream::consumer::uuid_field as id;
use pg_jetstream::{
    Context, Handler, HandlerError, Route, Router,
    consumer::{Statement, StatementHandler},
};
use shop_proto::Event;
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
    Router::new().on::<UserCreated>(Route::single())
}

/// The saga's steps read their orders without locks and write them once,
/// if unchanged (see [`Route::in_one_statement`]).
pub(crate) fn inventory_events() -> Router<HandlerState> {
    Router::new()
        .on::<InventoryReserved>(Route::in_one_statement())
        .on::<InventoryRejected>(Route::in_one_statement())
}

pub(crate) fn payment_events() -> Router<HandlerState> {
    Router::new()
        .on::<PaymentCompleted>(Route::in_one_statement())
        .on::<PaymentFailed>(Route::in_one_statement())
}

/// Remembers the user, so that orders can be checked against it.
impl Handler<UserCreated> for HandlerState {
    async fn handle(&self, cx: &mut Context<'_>, event: UserCreated) -> Result<(), HandlerError> {
        app::learn_user(cx.conn(), id("user_id", &event.user_id)?).await
    }
}

/// An event that moves an order's saga: the order it names, what it says
/// happened, and the total it carries, if any.
trait SagaStep {
    fn step(self) -> (String, SagaEvent, Option<i64>);
}

impl SagaStep for InventoryReserved {
    fn step(self) -> (String, SagaEvent, Option<i64>) {
        (self.order_id, SagaEvent::Reserved, Some(self.total_cents))
    }
}

impl SagaStep for InventoryRejected {
    fn step(self) -> (String, SagaEvent, Option<i64>) {
        (self.order_id, SagaEvent::Rejected(self.reason), None)
    }
}

impl SagaStep for PaymentCompleted {
    fn step(self) -> (String, SagaEvent, Option<i64>) {
        (
            self.order_id,
            SagaEvent::PaymentCompleted,
            Some(self.amount_cents),
        )
    }
}

impl SagaStep for PaymentFailed {
    fn step(self) -> (String, SagaEvent, Option<i64>) {
        (self.order_id, SagaEvent::PaymentFailed(self.reason), None)
    }
}

impl<E: Event + SagaStep> StatementHandler<E> for HandlerState {
    async fn handle_in_statement(
        &self,
        step: &mut Statement<'_>,
        events: Vec<E>,
    ) -> Result<(), HandlerError> {
        advance(self, step, events.into_iter().map(SagaStep::step).collect()).await
    }
}

/// Moves the batch's orders by its events (order id, saga event, total),
/// emits what the moves emit, and counts the sagas that ended, in one
/// statement.
async fn advance(
    h: &HandlerState,
    step: &mut Statement<'_>,
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
                subject: step.envelope(index).subject.clone(),
            })
        })
        .collect::<Result<Vec<_>, HandlerError>>()?;
    let mut advanced = app::advance(step.conn(), &progress).await?;
    if !advanced.change() {
        return Ok(());
    }
    let outcomes = std::mem::take(&mut advanced.outcomes);
    for (index, StepOutcome { emit, end }) in outcomes.into_iter().enumerate() {
        match emit {
            Some(EndEvent::Confirmed(event)) => step.emit(index, &event),
            Some(EndEvent::Cancelled(event)) => step.emit(index, &event),
            None => {}
        }
        if let Some(end) = end {
            let metrics = h.metrics.clone();
            step.after_commit(move || metrics.ended(&end));
        }
    }
    let carried = step.carry();
    app::write_advance(step.conn(), &advanced, &carried).await
}
