//! The order service's use cases and saga steps.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, SubsecRound as _, Utc};
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{
    Array, BigInt, Bool, Integer, Nullable, Text, Timestamptz, Uuid as SqlUuid,
};
use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl};
use shop_db::{Cached, PgPool};
use shop_messaging::{HandlerError, Outbox, OutboxWrite, OutgoingEvent};
use shop_proto::order::v1::{OrderCancelled, OrderConfirmed, OrderItem, OrderPlaced};
use shop_service::{ApiError, Caller, timestamp};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
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

/// PlaceOrder's one statement: the order, its lines, its first step and
/// `order.placed`, written only if the user is known and the idempotency key
/// is new (a key used before inserts nothing, after waiting for a concurrent
/// request with the same key to commit or not). One statement is one round
/// trip and commits by itself. Returns (user known, order written).
struct PlaceStatement<'a> {
    user_id: Uuid,
    order_id: Uuid,
    key: Option<&'a str>,
    deadline: DateTime<Utc>,
    now: DateTime<Utc>,
    skus: Vec<&'a str>,
    quantities: Vec<i32>,
    events: OutboxWrite,
}

impl QueryFragment<Pg> for PlaceStatement<'_> {
    fn walk_ast<'b>(&'b self, mut pass: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        pass.push_sql("WITH known AS (SELECT user_id FROM known_users WHERE user_id = ");
        pass.push_bind_param::<SqlUuid, _>(&self.user_id)?;
        pass.push_sql(
            "), placed AS (INSERT INTO orders (order_id, user_id, status, idempotency_key, \
             deadline, created_at, updated_at) SELECT ",
        );
        pass.push_bind_param::<SqlUuid, _>(&self.order_id)?;
        pass.push_sql(", user_id, ");
        pass.push_bind_param::<Text, _>(Status::Pending.as_str())?;
        pass.push_sql(", ");
        pass.push_bind_param::<Nullable<Text>, _>(&self.key)?;
        pass.push_sql(", ");
        pass.push_bind_param::<Timestamptz, _>(&self.deadline)?;
        pass.push_sql(", ");
        pass.push_bind_param::<Timestamptz, _>(&self.now)?;
        pass.push_sql(", ");
        pass.push_bind_param::<Timestamptz, _>(&self.now)?;
        pass.push_sql(
            " FROM known ON CONFLICT (user_id, idempotency_key) DO NOTHING RETURNING order_id), \
             items AS (INSERT INTO order_items (order_id, sku, quantity) \
             SELECT placed.order_id, item.sku, item.quantity FROM placed, unnest(",
        );
        pass.push_bind_param::<Array<Text>, _>(&self.skus)?;
        pass.push_sql(", ");
        pass.push_bind_param::<Array<Integer>, _>(&self.quantities)?;
        pass.push_sql(
            ") AS item (sku, quantity)), \
             steps AS (INSERT INTO order_steps (order_id, name, occurred_at) \
             SELECT order_id, ",
        );
        pass.push_bind_param::<Text, _>(PLACED)?;
        pass.push_sql(", ");
        pass.push_bind_param::<Timestamptz, _>(&self.now)?;
        pass.push_sql(" FROM placed), events AS (");
        self.events.walk_ast(pass.reborrow())?;
        pass.push_sql(") SELECT EXISTS (SELECT FROM known), EXISTS (SELECT FROM placed)");
        Ok(())
    }
}

impl Query for PlaceStatement<'_> {
    type SqlType = (Bool, Bool);
}

/// No static id: prepared once per connection, keyed by its text.
impl QueryId for PlaceStatement<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

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
    /// The same user, idempotency key and items return the first order;
    /// the same key with other items is FAILED_PRECONDITION.
    pub(crate) async fn place_order(
        &self,
        caller: &Caller,
        user_id: Uuid,
        items: &[(String, i32)],
        idempotency_key: &str,
    ) -> Result<Order, ApiError> {
        caller.require_user(user_id)?;
        let lines = OrderLines::parse(items).map_err(ApiError::InvalidArgument)?;
        if idempotency_key.chars().count() > 200 {
            return Err(ApiError::InvalidArgument(
                "idempotency_key must be at most 200 characters".into(),
            ));
        }
        if idempotency_key.contains('\0') {
            return Err(ApiError::InvalidArgument(
                "idempotency_key must not contain NUL characters".into(),
            ));
        }
        let key = Some(idempotency_key.to_owned()).filter(|key| !key.is_empty());
        let mut conn = self.pool.get().await?;
        let order_id = Uuid::now_v7();
        // What PostgreSQL keeps, so that the reply equals a later GetOrder.
        let now = Utc::now().trunc_subsecs(6);
        let deadline = now + self.deadline;
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
        let events = self.outbox.write_when(
            "placed",
            vec![OutgoingEvent::new(&event).correlated(order_id.to_string())],
        );
        let span = events.span().clone();
        let statement = PlaceStatement {
            user_id,
            order_id,
            key: key.as_deref(),
            deadline,
            now,
            skus: lines.lines().iter().map(|(sku, _)| sku.as_str()).collect(),
            quantities: lines
                .lines()
                .iter()
                .map(|(_, quantity)| *quantity)
                .collect(),
            events,
        };
        let result = match statement
            .get_result::<(bool, bool)>(&mut conn)
            .instrument(span)
            .await
        {
            Ok((false, _)) => Err(PlaceError::UnknownUser),
            Ok((true, false)) => Err(PlaceError::KeyTaken),
            Ok((true, true)) => {
                self.outbox.committed();
                Ok(())
            }
            Err(error) => Err(PlaceError::Database(error)),
        };
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
                    Some(existing) => {
                        let first = self.load_order(existing).await?;
                        // The key names one request: the same key for other
                        // items is a client's bug, not a retry.
                        let mut wanted = lines.lines().to_vec();
                        wanted.sort();
                        if first.items != wanted {
                            return Err(ApiError::FailedPrecondition(format!(
                                "idempotency_key {:?} was used for another order ({}) with other items: use a new key for a new order",
                                key.as_deref().unwrap_or_default(),
                                first.row.order_id
                            )));
                        }
                        Ok(first)
                    }
                    // Orders are never deleted.
                    None => Err(ApiError::Internal(format!(
                        "idempotency key {key:?} of user {user_id} is taken by no order"
                    ))),
                }
            }
            Err(PlaceError::Database(error)) => Err(error.into()),
        }
    }

    /// An order with its lines and steps: the caller's own, or anyone's for
    /// an administrator.
    pub(crate) async fn get_order(
        &self,
        caller: &Caller,
        order_id: Uuid,
    ) -> Result<Order, ApiError> {
        let order = self.load_order(order_id).await?;
        caller.require_user(order.row.user_id)?;
        Ok(order)
    }

    async fn load_order(&self, order_id: Uuid) -> Result<Order, ApiError> {
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
    /// previous page), in at most four statements whatever the page's size:
    /// the cursor, the orders, all their lines, all their steps.
    pub(crate) async fn list_orders(
        &self,
        caller: &Caller,
        user_id: Uuid,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<Order>, ApiError> {
        caller.require_user(user_id)?;
        let mut conn = self.pool.get().await?;
        let mut query = orders::table
            .filter(orders::user_id.eq(user_id))
            .order((orders::created_at.desc(), orders::order_id.desc()))
            .select(OrderRow::as_select())
            .limit(limit)
            .into_boxed();
        if let Some(after) = after {
            let cursor: DateTime<Utc> = orders::table
                .find(after)
                .filter(orders::user_id.eq(user_id))
                .select(orders::created_at)
                .first(&mut conn)
                .await
                .optional()?
                .ok_or_else(|| {
                    ApiError::InvalidArgument(
                        "page_token names no order of this user: pass the next_page_token of the previous page".into(),
                    )
                })?;
            query = query.filter(
                orders::created_at.lt(cursor).or(orders::created_at
                    .eq(cursor)
                    .and(orders::order_id.lt(after))),
            );
        }
        let rows: Vec<OrderRow> = query.load(&mut conn).await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = rows.iter().map(|row| row.order_id).collect();
        let lines: Vec<(Uuid, String, i32)> = order_items::table
            .filter(order_items::order_id.eq_any(&ids))
            .order((order_items::order_id, order_items::sku))
            .select((
                order_items::order_id,
                order_items::sku,
                order_items::quantity,
            ))
            .load(&mut conn)
            .await?;
        let steps: Vec<(Uuid, Step)> = order_steps::table
            .filter(order_steps::order_id.eq_any(&ids))
            .order((order_steps::order_id, order_steps::step_id))
            .select((order_steps::order_id, Step::as_select()))
            .load(&mut conn)
            .await?;
        let mut items_of: HashMap<Uuid, Vec<(String, i32)>> = HashMap::new();
        for (order_id, sku, quantity) in lines {
            items_of.entry(order_id).or_default().push((sku, quantity));
        }
        let mut steps_of: HashMap<Uuid, Vec<Step>> = HashMap::new();
        for (order_id, step) in steps {
            steps_of.entry(order_id).or_default().push(step);
        }
        Ok(rows
            .into_iter()
            .map(|row| Order {
                items: items_of.remove(&row.order_id).unwrap_or_default(),
                steps: steps_of.remove(&row.order_id).unwrap_or_default(),
                row,
            })
            .collect())
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
        if !overdue.is_empty() {
            self.outbox.committed();
        }
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

/// One saga event for an order.
pub(crate) struct Progress {
    pub(crate) order_id: Uuid,
    pub(crate) event: SagaEvent,
    /// The reservation's total or the payment's amount.
    pub(crate) total_cents: Option<i64>,
    /// The subject it came on: the step's name.
    pub(crate) subject: String,
}

/// What an event did to its order: the event to emit and how the saga
/// ended, if it ended.
pub(crate) struct Advanced {
    pub(crate) emit: Option<Emitted>,
    pub(crate) end: Option<SagaEnd>,
}

/// The event an order's move emits.
pub(crate) enum Emitted {
    Confirmed(OrderConfirmed),
    Cancelled(OrderCancelled),
}

/// An order as a batch of events moves it.
struct Moving {
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
    events: &[Progress],
) -> Result<Vec<Advanced>, HandlerError> {
    let mut order_ids: Vec<Uuid> = events.iter().map(|event| event.order_id).collect();
    order_ids.sort_unstable();
    order_ids.dedup();
    // Status, user, deadline, total, placed at; locked in id order.
    type Row = (Uuid, String, Uuid, DateTime<Utc>, i64, DateTime<Utc>);
    let rows: Vec<Row> = Cached(
        orders::table
            .filter(orders::order_id.eq_any(&order_ids))
            .order(orders::order_id)
            .select((
                orders::order_id,
                orders::status,
                orders::user_id,
                orders::deadline,
                orders::total_cents,
                orders::created_at,
            ))
            .for_update(),
    )
    .load(conn)
    .await?;
    let mut moving = HashMap::with_capacity(rows.len());
    for (order_id, status, user_id, deadline, total_cents, placed_at) in rows {
        let status = Status::parse(&status)
            .ok_or_else(|| HandlerError::permanent(format!("order status {status}")))?;
        moving.insert(
            order_id,
            Moving {
                status,
                user_id,
                deadline,
                total_cents,
                placed_at,
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
        let order = moving
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
                (Some(Emitted::Confirmed(confirmed)), Some(end))
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
                (Some(Emitted::Cancelled(cancelled)), Some(end))
            }
        };
        if end.is_some() {
            order.changed = true;
            order.status_changed = true;
        }
        advanced.push(Advanced { emit, end });
    }
    write_moves(conn, &moving, &steps).await?;
    Ok(advanced)
}

/// Writes the orders a batch changed and the steps it recorded (in this
/// order), in one statement.
async fn write_moves(
    conn: &mut AsyncPgConnection,
    moving: &HashMap<Uuid, Moving>,
    steps: &[(Uuid, String, String)],
) -> QueryResult<()> {
    let changed: Vec<(&Uuid, &Moving)> = moving.iter().filter(|(_, order)| order.changed).collect();
    if changed.is_empty() && steps.is_empty() {
        return Ok(());
    }
    let order_ids: Vec<Uuid> = changed.iter().map(|(id, _)| **id).collect();
    let statuses: Vec<&str> = changed
        .iter()
        .map(|(_, order)| order.status.as_str())
        .collect();
    let totals: Vec<i64> = changed.iter().map(|(_, order)| order.total_cents).collect();
    let reasons: Vec<Option<&str>> = changed
        .iter()
        .map(|(_, order)| order.cancel_reason.as_deref())
        .collect();
    let moved: Vec<bool> = changed
        .iter()
        .map(|(_, order)| order.status_changed)
        .collect();
    let (step_orders, (names, details)): (Vec<Uuid>, (Vec<&str>, Vec<&str>)) = steps
        .iter()
        .map(|(order_id, name, detail)| (*order_id, (name.as_str(), detail.as_str())))
        .unzip();
    Cached(
        diesel::sql_query(
            "WITH moved_orders AS (UPDATE orders SET status = moved.status, \
             total_cents = moved.total_cents, \
             cancel_reason = coalesce(moved.cancel_reason, orders.cancel_reason), \
             updated_at = CASE WHEN moved.moved THEN now() ELSE orders.updated_at END \
             FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::bool[]) \
             AS moved (order_id, status, total_cents, cancel_reason, moved) \
             WHERE orders.order_id = moved.order_id) \
             INSERT INTO order_steps (order_id, name, detail) \
             SELECT step.order_id, step.name, step.detail \
             FROM unnest($6::uuid[], $7::text[], $8::text[]) WITH ORDINALITY \
             AS step (order_id, name, detail, position) ORDER BY step.position",
        )
        .bind::<Array<SqlUuid>, _>(&order_ids)
        .bind::<Array<Text>, _>(&statuses)
        .bind::<Array<BigInt>, _>(&totals)
        .bind::<Array<Nullable<Text>>, _>(&reasons)
        .bind::<Array<Bool>, _>(&moved)
        .bind::<Array<SqlUuid>, _>(&step_orders)
        .bind::<Array<Text>, _>(&names)
        .bind::<Array<Text>, _>(&details),
    )
    .execute(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use shop_test_support::TestPostgres;

    use super::*;

    fn admin() -> Caller {
        Caller::new("admin", vec![shop_service::roles::ADMIN.into()])
    }

    fn progress(order_id: Uuid, event: SagaEvent, total_cents: Option<i64>) -> Progress {
        let subject = match &event {
            SagaEvent::Reserved => "inventory.reserved",
            SagaEvent::Rejected(_) => "inventory.rejected",
            SagaEvent::PaymentCompleted => "payment.completed",
            SagaEvent::PaymentFailed(_) => "payment.failed",
        };
        Progress {
            order_id,
            event,
            total_cents,
            subject: subject.into(),
        }
    }

    /// A migrated order database, its pool and the use cases on it.
    async fn order_database() -> (TestPostgres, PgPool, Orders) {
        let postgres = TestPostgres::start().await;
        let url = postgres.create_database("orders").await;
        shop_db::migrate(&url, vec![shop_messaging::MIGRATIONS, crate::MIGRATIONS])
            .await
            .unwrap();
        let pool = shop_db::pool(&url, 2).unwrap();
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
        let (ann, bob) = (ann.row.order_id, bob.row.order_id);

        let events = [
            progress(ann, SagaEvent::Reserved, Some(1999)),
            progress(bob, SagaEvent::Reserved, Some(500)),
            progress(ann, SagaEvent::PaymentCompleted, Some(1999)),
            progress(bob, SagaEvent::PaymentFailed("no money".into()), None),
            // Too late: the order is confirmed already.
            progress(ann, SagaEvent::PaymentFailed("late".into()), None),
        ];
        let advanced = advance(&mut conn, &events).await.unwrap();
        let summary: Vec<String> = advanced
            .iter()
            .map(|advanced| match (&advanced.emit, &advanced.end) {
                (Some(Emitted::Confirmed(event)), Some(end)) => {
                    format!("{} {}", end.outcome, event.total_cents)
                }
                (Some(Emitted::Cancelled(event)), Some(end)) => {
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
                ann.row.status.as_str(),
                ann.row.total_cents,
                ann.row.cancel_reason.as_str()
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
                bob.row.status.as_str(),
                bob.row.total_cents,
                bob.row.cancel_reason.as_str()
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
        let error = advance(
            &mut conn,
            &[progress(Uuid::now_v7(), SagaEvent::Reserved, None)],
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(error, HandlerError::Permanent(_)), "{error}");
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
            let events = diesel::sql_query(
                "SELECT event_type, source, correlation_id FROM outbox ORDER BY seq",
            )
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
        let order_id = order.row.order_id;
        let event = Written {
            event_type: "shop.order.v1.OrderPlaced".into(),
            source: "shop/order".into(),
            correlation_id: Some(order_id.to_string()),
        };
        assert_eq!(written().await, (1, 2, 1, vec![event.clone()]));
        let stored = orders.load_order(order_id).await.unwrap();
        assert_eq!(stored.row.status, "PENDING");
        assert_eq!(stored.row.created_at, order.row.created_at);
        assert_eq!(
            stored.items,
            [("DESK".to_owned(), 1), ("LAMP".to_owned(), 2)]
        );
        assert_eq!(stored.steps.len(), 1);
        assert_eq!(stored.steps[0].occurred_at, order.row.created_at);

        // The same key and items: the first order, and nothing more written.
        let again = orders
            .place_order(&admin(), user_id, &items, "k1")
            .await
            .unwrap();
        assert_eq!(again.row.order_id, order_id);
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
        assert_ne!(other.row.order_id, order_id);
        assert_eq!(written().await.0, 2);
    }
}
