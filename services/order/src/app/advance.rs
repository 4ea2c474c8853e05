//! What the saga's events do to their orders: a user remembered, an order
//! confirmed or cancelled.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use diesel_async::AsyncPgConnection;
use pg_jetstream::{HandlerError, consumer::Carried};
use shop_proto::order::v1::{OrderCancelled, OrderConfirmed};
use shop_service::unknown_stored;
use uuid::Uuid;

use crate::domain::{self, Decision, SagaEvent, Status};
use crate::metrics::SagaEnd;
use crate::store::{self, MovedOrders, NewSteps};

/// On `user.created`: remember a user, so that PlaceOrder accepts them.
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
#[derive(Debug)]
pub(crate) struct StepOutcome {
    pub(crate) emit: Option<EndEvent>,
    pub(crate) end: Option<SagaEnd>,
}

/// The event an order's move emits.
#[derive(Debug)]
pub(crate) enum EndEvent {
    Confirmed(OrderConfirmed),
    Cancelled(OrderCancelled),
}

/// What a batch of saga events decided: each event's outcome, and what
/// [`write_advance`] writes.
#[derive(Debug)]
pub(crate) struct Advanced {
    /// One per event, in the order given.
    pub(crate) outcomes: Vec<StepOutcome>,
    moved: MovedOrders,
    steps: NewSteps,
}

impl Advanced {
    /// Whether the decisions change anything.
    pub(crate) fn change(&self) -> bool {
        !self.moved.order_ids.is_empty() || !self.steps.order_ids.is_empty()
    }
}

/// An order as a batch of events moves it.
struct OrderState {
    /// As read.
    read_status: Status,
    read_total: i64,
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

/// The confirmation, the cancellation and the bookkeeping of the other steps, for several events one
/// after another in the order given, decided on the orders as read (without
/// locks): moves each order as [`domain::decide`] says and records the
/// steps; [`write_advance`] writes it only if the orders it changes are
/// still as read.
pub(crate) async fn advance(
    conn: &mut AsyncPgConnection,
    events: &[StepEvent],
) -> Result<Advanced, HandlerError> {
    let mut order_ids: Vec<Uuid> = events.iter().map(|event| event.order_id).collect();
    order_ids.sort_unstable();
    order_ids.dedup();
    let mut orders = BTreeMap::new();
    for row in store::saga_orders(conn, &order_ids).await? {
        let status = Status::parse(&row.status).map_err(unknown_stored)?;
        orders.insert(
            row.order_id,
            OrderState {
                read_status: status,
                read_total: row.total_cents,
                status,
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
    let mut new_steps = NewSteps::default();
    let mut step = |order_id: Uuid, name: String, detail: String| {
        new_steps.order_ids.push(order_id);
        new_steps.names.push(name);
        new_steps.details.push(detail);
    };
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
        step(order_id, event.subject.clone(), detail);
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
                step(order_id, "order.confirmed".into(), String::new());
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
                step(order_id, "order.cancelled".into(), reason.clone());
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
    // In id order, the order every writer takes the orders in.
    let mut moved = MovedOrders::default();
    for (order_id, order) in orders.into_iter().filter(|(_, order)| order.changed) {
        moved.order_ids.push(order_id);
        moved.statuses.push(order.status.as_str());
        moved.totals.push(order.total_cents);
        moved.cancel_reasons.push(order.cancel_reason);
        moved.moved.push(order.status_changed);
        moved.read_statuses.push(order.read_status.as_str());
        moved.read_totals.push(order.read_total);
    }
    Ok(Advanced {
        outcomes: advanced,
        moved,
        steps: new_steps,
    })
}

/// Writes what [`advance`] decided, with what the step carries, in one
/// statement; a serialization failure if an order it changes changed since
/// it was read.
pub(crate) async fn write_advance(
    conn: &mut AsyncPgConnection,
    advanced: &Advanced,
    carried: &Carried,
) -> Result<(), HandlerError> {
    store::write_moves(conn, &advanced.moved, &advanced.steps, carried).await?;
    Ok(())
}
