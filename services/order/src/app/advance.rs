//! Steps 0', 4 and c1: what the saga's events do to their orders.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use diesel_async::AsyncPgConnection;
use shop_messaging::HandlerError;
use shop_proto::order::v1::{OrderCancelled, OrderConfirmed};
use shop_service::unknown_stored;
use uuid::Uuid;

use crate::domain::{self, Decision, SagaEvent, Status};
use crate::metrics::SagaEnd;
use crate::store::{self, MovedOrders, NewSteps};

/// Step 0': remember a user, so that PlaceOrder accepts them.
pub(crate) async fn learn_user(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
) -> Result<(), HandlerError> {
    store::learn_user(conn, user_id).await?;
    Ok(())
}

/// One saga event for an order.
pub(crate) struct StepEvent {
    pub(crate) order_id: Uuid,
    pub(crate) event: SagaEvent,
    /// The reservation's total or the payment's amount.
    pub(crate) total_cents: Option<i64>,
    /// The subject it came on: the step's name.
    pub(crate) subject: String,
}

/// What an event did to its order: the event to emit and how the saga
/// ended, if it ended.
pub(crate) struct StepOutcome {
    pub(crate) emit: Option<EndEvent>,
    pub(crate) end: Option<SagaEnd>,
}

/// The event an order's move emits.
pub(crate) enum EndEvent {
    Confirmed(OrderConfirmed),
    Cancelled(OrderCancelled),
}

/// An order as a batch of events moves it.
struct OrderState {
    status: Status,
    user_id: Uuid,
    deadline: DateTime<Utc>,
    total_cents: i64,
    placed_at: DateTime<Utc>,
    cancel_reason: Option<String>,
    /// Whether the status or the total changed.
    changed: bool,
    status_changed: bool,
}

/// Steps 4, c1 and the bookkeeping of the others, for several events one
/// after another in the order given: moves each order as
/// [`domain::decide`] says and records the steps. A few statements whatever
/// the number of events.
pub(crate) async fn advance(
    conn: &mut AsyncPgConnection,
    events: &[StepEvent],
) -> Result<Vec<StepOutcome>, HandlerError> {
    let mut order_ids: Vec<Uuid> = events.iter().map(|event| event.order_id).collect();
    order_ids.sort_unstable();
    order_ids.dedup();
    let mut orders = HashMap::new();
    for row in store::lock_orders(conn, &order_ids).await? {
        orders.insert(
            row.order_id,
            OrderState {
                status: Status::parse(&row.status).map_err(unknown_stored)?,
                user_id: row.user_id,
                deadline: row.deadline,
                total_cents: row.total_cents,
                placed_at: row.placed_at,
                cancel_reason: None,
                changed: false,
                status_changed: false,
            },
        );
    }
    let now = Utc::now();
    let mut steps: Vec<(Uuid, String, String)> = Vec::new();
    let mut advanced = Vec::with_capacity(events.len());
    for event in events {
        let order_id = event.order_id;
        // The order commits before its `order.placed` is published, so
        // every later event finds it.
        let order = orders
            .get_mut(&order_id)
            .ok_or_else(|| HandlerError::permanent(format!("no order {order_id}")))?;
        let detail = match &event.event {
            SagaEvent::Rejected(reason) | SagaEvent::PaymentFailed(reason) => reason.clone(),
            _ => String::new(),
        };
        steps.push((order_id, event.subject.clone(), detail));
        // The payment's amount, or the reservation's total, while it can
        // change.
        if let Some(total) = event
            .total_cents
            .filter(|_| order.status == Status::Pending)
        {
            order.changed |= total != order.total_cents;
            order.total_cents = total;
        }
        let (emit, end) = match domain::decide(order.status, order.deadline, now, &event.event) {
            Decision::Record => (None, None),
            Decision::Confirm => {
                order.status = Status::Confirmed;
                steps.push((order_id, "order.confirmed".into(), String::new()));
                let confirmed = OrderConfirmed {
                    order_id: order_id.to_string(),
                    user_id: order.user_id.to_string(),
                    total_cents: order.total_cents,
                };
                let end = SagaEnd {
                    outcome: "confirmed",
                    reason: String::new(),
                    placed_at: order.placed_at,
                };
                (Some(EndEvent::Confirmed(confirmed)), Some(end))
            }
            Decision::Cancel(reason) => {
                order.status = Status::Cancelled;
                order.cancel_reason = Some(reason.clone());
                steps.push((order_id, "order.cancelled".into(), reason.clone()));
                let cancelled = OrderCancelled {
                    order_id: order_id.to_string(),
                    user_id: order.user_id.to_string(),
                    reason: reason.clone(),
                };
                let end = SagaEnd {
                    outcome: "cancelled",
                    reason,
                    placed_at: order.placed_at,
                };
                (Some(EndEvent::Cancelled(cancelled)), Some(end))
            }
        };
        if end.is_some() {
            order.changed = true;
            order.status_changed = true;
        }
        advanced.push(StepOutcome { emit, end });
    }
    let changed = orders.iter().filter(|(_, order)| order.changed);
    let mut moved = MovedOrders::default();
    for (order_id, order) in changed {
        moved.order_ids.push(*order_id);
        moved.statuses.push(order.status.as_str());
        moved.totals.push(order.total_cents);
        moved.cancel_reasons.push(order.cancel_reason.as_deref());
        moved.moved.push(order.status_changed);
    }
    if moved.order_ids.is_empty() && steps.is_empty() {
        return Ok(advanced);
    }
    let mut new_steps = NewSteps::default();
    for (order_id, name, detail) in &steps {
        new_steps.order_ids.push(*order_id);
        new_steps.names.push(name);
        new_steps.details.push(detail);
    }
    store::write_moves(conn, &moved, &new_steps).await?;
    Ok(advanced)
}
