//! The order service's use cases and saga steps.

use std::time::Duration;

use chrono::{DateTime, SubsecRound as _, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl};
use shop_db::{Cached, PgPool};
use shop_messaging::{HandlerError, Outbox, OutgoingEvent};
use shop_proto::order::v1::{OrderCancelled, OrderConfirmed, OrderItem, OrderPlaced};
use shop_service::{ApiError, timestamp};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::domain::{self, Decision, OrderLines, SagaEvent, Status};
use crate::metrics::{SagaEnd, SagaMetrics};
use crate::schema::{known_users, order_items, order_steps, orders};

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = orders)]
pub(crate) struct OrderRow {
    pub(crate) order_id: Uuid,
    pub(crate) user_id: Uuid,
    pub(crate) status: String,
    pub(crate) total_cents: i64,
    pub(crate) cancel_reason: String,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = order_steps)]
pub(crate) struct Step {
    pub(crate) name: String,
    pub(crate) detail: String,
    pub(crate) occurred_at: DateTime<Utc>,
}

/// An order with its lines and saga steps.
#[derive(Debug, Clone)]
pub(crate) struct Order {
    pub(crate) row: OrderRow,
    pub(crate) items: Vec<(String, i32)>,
    pub(crate) steps: Vec<Step>,
}

/// The first step of every saga.
const PLACED: &str = "order.placed";

/// The order use cases.
#[derive(Clone)]
pub(crate) struct Orders {
    pool: PgPool,
    outbox: Outbox,
    deadline: Duration,
    metrics: SagaMetrics,
}

enum PlaceError {
    UnknownUser,
    /// The user placed an order with this idempotency key before.
    KeyTaken,
    Database(diesel::result::Error),
}

impl From<diesel::result::Error> for PlaceError {
    fn from(error: diesel::result::Error) -> Self {
        Self::Database(error)
    }
}

impl Orders {
    pub(crate) fn new(
        pool: PgPool,
        outbox: Outbox,
        deadline: Duration,
        metrics: SagaMetrics,
    ) -> Self {
        Self {
            pool,
            outbox,
            deadline,
            metrics,
        }
    }

    /// Saga step 1: a PENDING order and `order.placed`, in one transaction.
    /// The same user and idempotency key return the first order.
    pub(crate) async fn place_order(
        &self,
        user_id: Uuid,
        items: &[(String, i32)],
        idempotency_key: &str,
    ) -> Result<Order, ApiError> {
        let lines = OrderLines::parse(items).map_err(ApiError::InvalidArgument)?;
        if idempotency_key.chars().count() > 200 {
            return Err(ApiError::InvalidArgument(
                "idempotency_key must be at most 200 characters".into(),
            ));
        }
        let key = Some(idempotency_key.to_owned()).filter(|key| !key.is_empty());
        let mut conn = self.pool.get().await?;
        let order_id = Uuid::now_v7();
        // What PostgreSQL keeps, so that the reply equals a later GetOrder.
        let now = Utc::now().trunc_subsecs(6);
        let deadline = now + self.deadline;
        let outbox = self.outbox.clone();
        let result = conn
            .transaction::<_, PlaceError, _>(async |conn| {
                let known: Option<Uuid> = known_users::table
                    .find(user_id)
                    .select(known_users::user_id)
                    .first(conn)
                    .await
                    .optional()?;
                if known.is_none() {
                    return Err(PlaceError::UnknownUser);
                }
                // A key used before inserts nothing (after waiting for a
                // concurrent request with the same key to commit or not).
                let inserted = Cached(
                    diesel::insert_into(orders::table)
                        .values((
                            orders::order_id.eq(order_id),
                            orders::user_id.eq(user_id),
                            orders::status.eq(Status::Pending.as_str()),
                            orders::idempotency_key.eq(key.as_deref()),
                            orders::deadline.eq(deadline),
                            orders::created_at.eq(now),
                            orders::updated_at.eq(now),
                        ))
                        .on_conflict((orders::user_id, orders::idempotency_key))
                        .do_nothing(),
                )
                .execute(conn)
                .await?;
                if inserted == 0 {
                    return Err(PlaceError::KeyTaken);
                }
                let rows: Vec<_> = lines
                    .lines()
                    .iter()
                    .map(|(sku, quantity)| {
                        (
                            order_items::order_id.eq(order_id),
                            order_items::sku.eq(sku),
                            order_items::quantity.eq(*quantity),
                        )
                    })
                    .collect();
                Cached(diesel::insert_into(order_items::table).values(&rows))
                    .execute(conn)
                    .await?;
                diesel::insert_into(order_steps::table)
                    .values((
                        order_steps::order_id.eq(order_id),
                        order_steps::name.eq(PLACED),
                        order_steps::occurred_at.eq(now),
                    ))
                    .execute(conn)
                    .await?;
                let event = OrderPlaced {
                    order_id: order_id.to_string(),
                    user_id: user_id.to_string(),
                    items: lines
                        .lines()
                        .iter()
                        .map(|(sku, quantity)| OrderItem {
                            sku: sku.clone(),
                            quantity: *quantity,
                        })
                        .collect(),
                    placed_at: Some(timestamp(now)),
                    deadline: Some(timestamp(deadline)),
                };
                outbox
                    .append(
                        conn,
                        &[OutgoingEvent::new(&event).correlated(order_id.to_string())],
                    )
                    .await?;
                Ok(())
            })
            .await;
        // Back to the pool before reading anything else: holding one
        // connection while waiting for another can exhaust the pool.
        drop(conn);
        match result {
            // The order as this transaction wrote it: later steps of its saga
            // may have begun already, and GetOrder shows them.
            Ok(()) => {
                let mut items = lines.lines().to_vec();
                items.sort();
                Ok(Order {
                    row: OrderRow {
                        order_id,
                        user_id,
                        status: Status::Pending.as_str().to_owned(),
                        total_cents: 0,
                        cancel_reason: String::new(),
                        created_at: now,
                        updated_at: now,
                    },
                    items,
                    steps: vec![Step {
                        name: PLACED.to_owned(),
                        detail: String::new(),
                        occurred_at: now,
                    }],
                })
            }
            Err(PlaceError::UnknownUser) => Err(ApiError::FailedPrecondition(format!(
                "unknown user {user_id}: create the user first (a new user is known to the order service moments after CreateUser)"
            ))),
            // The first order with this key is the answer.
            Err(PlaceError::KeyTaken) => {
                let mut conn = self.pool.get().await?;
                let existing = by_key(&mut conn, user_id, key.as_deref()).await?;
                drop(conn);
                match existing {
                    Some(existing) => self.get_order(existing).await,
                    // Orders are never deleted.
                    None => Err(ApiError::Internal(format!(
                        "idempotency key {key:?} of user {user_id} is taken by no order"
                    ))),
                }
            }
            Err(PlaceError::Database(error)) => Err(error.into()),
        }
    }

    pub(crate) async fn get_order(&self, order_id: Uuid) -> Result<Order, ApiError> {
        let mut conn = self.pool.get().await?;
        let row = orders::table
            .find(order_id)
            .select(OrderRow::as_select())
            .first(&mut conn)
            .await
            .optional()?
            .ok_or_else(|| ApiError::NotFound(format!("no order {order_id}")))?;
        let items = order_items::table
            .filter(order_items::order_id.eq(order_id))
            .order(order_items::sku)
            .select((order_items::sku, order_items::quantity))
            .load(&mut conn)
            .await?;
        let steps = order_steps::table
            .filter(order_steps::order_id.eq(order_id))
            .order(order_steps::step_id)
            .select(Step::as_select())
            .load(&mut conn)
            .await?;
        Ok(Order { row, items, steps })
    }

    /// A user's orders, newest first, after `after` (the last order of the
    /// previous page).
    pub(crate) async fn list_orders(
        &self,
        user_id: Uuid,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<Order>, ApiError> {
        let ids: Vec<Uuid> = {
            let mut conn = self.pool.get().await?;
            let mut query = orders::table
                .filter(orders::user_id.eq(user_id))
                .order((orders::created_at.desc(), orders::order_id.desc()))
                .select(orders::order_id)
                .limit(limit)
                .into_boxed();
            if let Some(after) = after {
                let cursor: DateTime<Utc> = orders::table
                    .find(after)
                    .select(orders::created_at)
                    .first(&mut conn)
                    .await
                    .optional()?
                    .ok_or_else(|| ApiError::InvalidArgument("page_token names no order".into()))?;
                query = query.filter(
                    orders::created_at.lt(cursor).or(orders::created_at
                        .eq(cursor)
                        .and(orders::order_id.lt(after))),
                );
            }
            query.load(&mut conn).await?
        };
        let mut found = Vec::with_capacity(ids.len());
        for id in ids {
            found.push(self.get_order(id).await?);
        }
        Ok(found)
    }

    /// Step t: cancels PENDING orders past their deadline, a batch per
    /// transaction, until shutdown. Replicas share the work (`SKIP LOCKED`).
    pub(crate) async fn run_deadline_sweeper(self, shutdown: CancellationToken) {
        loop {
            match self.cancel_overdue().await {
                Ok(count) if count > 0 => continue,
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "deadline sweep failed"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    async fn cancel_overdue(&self) -> Result<usize, ApiError> {
        let mut conn = self.pool.get().await?;
        let outbox = self.outbox.clone();
        let overdue = conn
            .transaction::<_, diesel::result::Error, _>(async |conn| {
                let overdue: Vec<(Uuid, Uuid, DateTime<Utc>)> = orders::table
                    .filter(orders::status.eq(Status::Pending.as_str()))
                    .filter(orders::deadline.lt(Utc::now()))
                    .select((orders::order_id, orders::user_id, orders::created_at))
                    .limit(100)
                    .for_update()
                    .skip_locked()
                    .load(conn)
                    .await?;
                for (order_id, user_id, _) in &overdue {
                    cancel(conn, &outbox, *order_id, *user_id, domain::TIMEOUT, None).await?;
                }
                Ok(overdue)
            })
            .await?;
        for (_, _, placed_at) in &overdue {
            self.metrics.ended(&SagaEnd {
                outcome: "cancelled",
                reason: domain::TIMEOUT.to_owned(),
                placed_at: *placed_at,
            });
        }
        Ok(overdue.len())
    }
}

/// The order placed with `key` by `user_id`, if any.
async fn by_key(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
    key: Option<&str>,
) -> QueryResult<Option<Uuid>> {
    let Some(key) = key else { return Ok(None) };
    orders::table
        .filter(orders::user_id.eq(user_id))
        .filter(orders::idempotency_key.eq(key))
        .select(orders::order_id)
        .first(conn)
        .await
        .optional()
}

/// Appends `steps` (name, detail) to the order's timeline, in this order.
pub(crate) async fn record_steps(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
    steps: &[(&str, &str)],
) -> QueryResult<usize> {
    let rows: Vec<_> = steps
        .iter()
        .map(|(name, detail)| {
            (
                order_steps::order_id.eq(order_id),
                order_steps::name.eq(*name),
                order_steps::detail.eq(*detail),
            )
        })
        .collect();
    Cached(diesel::insert_into(order_steps::table).values(&rows))
        .execute(conn)
        .await
}

/// Cancels a PENDING order and writes `order.cancelled` to the outbox (with
/// `cause` as its causation when a handler cancels).
async fn cancel(
    conn: &mut AsyncPgConnection,
    outbox: &Outbox,
    order_id: Uuid,
    user_id: Uuid,
    reason: &str,
    cause: Option<&shop_messaging::Envelope>,
) -> QueryResult<()> {
    Cached(diesel::update(orders::table.find(order_id)).set((
        orders::status.eq(Status::Cancelled.as_str()),
        orders::cancel_reason.eq(reason),
        orders::updated_at.eq(diesel::dsl::now),
    )))
    .execute(conn)
    .await?;
    record_steps(conn, order_id, &[("order.cancelled", reason)]).await?;
    let event = OrderCancelled {
        order_id: order_id.to_string(),
        user_id: user_id.to_string(),
        reason: reason.to_owned(),
    };
    let mut outgoing = OutgoingEvent::new(&event).correlated(order_id.to_string());
    if let Some(cause) = cause {
        outgoing = outgoing.caused_by(cause.id);
    }
    outbox.append(conn, &[outgoing]).await?;
    Ok(())
}

/// Step 0': remember a user, so that PlaceOrder accepts them.
pub(crate) async fn learn_user(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
) -> Result<(), HandlerError> {
    diesel::insert_into(known_users::table)
        .values(known_users::user_id.eq(user_id))
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    Ok(())
}

/// Steps 4, c1 and the bookkeeping of the others: moves the order as
/// [`domain::decide`] says and records the step.
pub(crate) async fn advance(
    conn: &mut AsyncPgConnection,
    outbox: &Outbox,
    cause: &shop_messaging::Envelope,
    order_id: Uuid,
    event: SagaEvent,
    total_cents: Option<i64>,
) -> Result<Option<SagaEnd>, HandlerError> {
    // Status, user, deadline, total, placed at.
    type Row = (String, Uuid, DateTime<Utc>, i64, DateTime<Utc>);
    let row: Option<Row> = orders::table
        .find(order_id)
        .select((
            orders::status,
            orders::user_id,
            orders::deadline,
            orders::total_cents,
            orders::created_at,
        ))
        .for_update()
        .first(conn)
        .await
        .optional()?;
    // The order commits before its `order.placed` is published, so every
    // later event finds it.
    let (status, user_id, deadline, known_total, placed_at) =
        row.ok_or_else(|| HandlerError::permanent(format!("no order {order_id}")))?;
    let status = Status::parse(&status)
        .ok_or_else(|| HandlerError::permanent(format!("order status {status}")))?;
    let detail = match &event {
        SagaEvent::Rejected(reason) | SagaEvent::PaymentFailed(reason) => reason.clone(),
        _ => String::new(),
    };
    let step = (cause.subject.as_str(), detail.as_str());
    // The payment's amount, or the reservation's total, while it can change.
    let total = total_cents.filter(|_| status == Status::Pending);
    let decision = domain::decide(status, deadline, Utc::now(), &event);
    // A confirmation writes its step and total with the status change.
    if decision != Decision::Confirm {
        record_steps(conn, order_id, &[step]).await?;
        if let Some(total) = total {
            Cached(diesel::update(orders::table.find(order_id)).set(orders::total_cents.eq(total)))
                .execute(conn)
                .await?;
        }
    }
    let end = match decision {
        Decision::Record => None,
        Decision::Confirm => {
            let total = total.unwrap_or(known_total);
            Cached(diesel::update(orders::table.find(order_id)).set((
                orders::status.eq(Status::Confirmed.as_str()),
                orders::total_cents.eq(total),
                orders::updated_at.eq(diesel::dsl::now),
            )))
            .execute(conn)
            .await?;
            record_steps(conn, order_id, &[step, ("order.confirmed", "")]).await?;
            let confirmed = OrderConfirmed {
                order_id: order_id.to_string(),
                user_id: user_id.to_string(),
                total_cents: total,
            };
            outbox
                .append(
                    conn,
                    &[OutgoingEvent::new(&confirmed)
                        .correlated(order_id.to_string())
                        .caused_by(cause.id)],
                )
                .await?;
            Some(SagaEnd {
                outcome: "confirmed",
                reason: String::new(),
                placed_at,
            })
        }
        Decision::Cancel(reason) => {
            cancel(conn, outbox, order_id, user_id, &reason, Some(cause)).await?;
            Some(SagaEnd {
                outcome: "cancelled",
                reason,
                placed_at,
            })
        }
    };
    Ok(end)
}
