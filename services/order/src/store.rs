//! Every SQL statement of the order service, each once, named after what
//! it does, its parameters bound beside its text, on the connection (or
//! transaction) it is given.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{
    Array, BigInt, Bool, Integer, Nullable, Text, Timestamptz, Uuid as SqlUuid,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use pg_jetstream::consumer::Carried;
use pg_jetstream::db::KeepPrepared;
use pg_jetstream::outbox::OutboxWrite;
use uuid::Uuid;

use crate::domain::Status;
use crate::schema::{known_users, order_items, order_steps, orders};

/// An order as stored.
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

/// A step of an order's saga, as its timeline shows it.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = order_steps)]
pub(crate) struct Step {
    pub(crate) name: String,
    pub(crate) detail: String,
    pub(crate) occurred_at: DateTime<Utc>,
}

/// The first step of every saga.
pub(crate) const PLACED: &str = "order.placed";

/// PlaceOrder's one statement: the order, its lines, its first step and
/// `order.placed`, written only if the user is known and the idempotency key
/// is new (a key used before inserts nothing, after waiting for a concurrent
/// request with the same key to commit or not). One statement is one round
/// trip and commits by itself.
///
/// `$1` user, `$2` order, `$3` idempotency key (or NULL), `$4` deadline,
/// `$5` now, `$6` and `$7` the lines' SKUs and quantities, `$8` the events
/// (`OutboxWrite::json`). The last column is what makes PostgreSQL run
/// `events` (a `SELECT`, unlike the `INSERT`s, runs only when read).
pub(crate) const PLACE_ORDER: &str = "\
WITH known AS (SELECT user_id FROM known_users WHERE user_id = $1),
placed AS (
    INSERT INTO orders (order_id, user_id, status, idempotency_key, deadline, created_at, updated_at)
    SELECT $2::uuid, user_id, 'PENDING', $3::text, $4::timestamptz, $5::timestamptz, $5 FROM known
    ON CONFLICT (user_id, idempotency_key) DO NOTHING
    RETURNING order_id),
items AS (
    INSERT INTO order_items (order_id, sku, quantity)
    SELECT placed.order_id, item.sku, item.quantity
    FROM placed, unnest($6::text[], $7::int4[]) AS item (sku, quantity)),
steps AS (
    INSERT INTO order_steps (order_id, name, occurred_at)
    SELECT order_id, 'order.placed', $5 FROM placed),
events AS (SELECT outbox_write($8::jsonb) FROM placed)
SELECT EXISTS (SELECT FROM known) AS known,
       EXISTS (SELECT FROM placed) AS placed,
       (SELECT count(*) FROM events) AS events";

/// What [`PLACE_ORDER`] did.
#[derive(Debug, QueryableByName)]
pub(crate) struct Placement {
    /// The user is known.
    #[diesel(sql_type = Bool)]
    pub(crate) known: bool,
    /// The order was written (its key was new).
    #[diesel(sql_type = Bool)]
    pub(crate) placed: bool,
}

/// Runs [`PLACE_ORDER`].
#[allow(clippy::too_many_arguments)]
pub(crate) async fn place_order(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
    order_id: Uuid,
    key: Option<&str>,
    deadline: DateTime<Utc>,
    now: DateTime<Utc>,
    lines: &[(String, i32)],
    events: &OutboxWrite,
) -> QueryResult<Placement> {
    let skus: Vec<&str> = lines.iter().map(|(sku, _)| sku.as_str()).collect();
    let quantities: Vec<i32> = lines.iter().map(|(_, quantity)| *quantity).collect();
    KeepPrepared(
        diesel::sql_query(PLACE_ORDER)
            .bind::<SqlUuid, _>(user_id)
            .bind::<SqlUuid, _>(order_id)
            .bind::<Nullable<Text>, _>(key)
            .bind::<Timestamptz, _>(deadline)
            .bind::<Timestamptz, _>(now)
            .bind::<Array<Text>, _>(skus)
            .bind::<Array<Integer>, _>(quantities)
            .bind::<Text, _>(events.json()),
    )
    .get_result(conn)
    .await
}

/// The order placed with `key` by `user_id`, if any.
pub(crate) async fn order_by_key(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
    key: &str,
) -> QueryResult<Option<Uuid>> {
    orders::table
        .filter(orders::user_id.eq(user_id))
        .filter(orders::idempotency_key.eq(key))
        .select(orders::order_id)
        .first(conn)
        .await
        .optional()
}

pub(crate) async fn order(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
) -> QueryResult<Option<OrderRow>> {
    orders::table
        .find(order_id)
        .select(OrderRow::as_select())
        .first(conn)
        .await
        .optional()
}

/// An order's lines, in SKU order.
pub(crate) async fn items_of(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
) -> QueryResult<Vec<(String, i32)>> {
    order_items::table
        .filter(order_items::order_id.eq(order_id))
        .order(order_items::sku)
        .select((order_items::sku, order_items::quantity))
        .load(conn)
        .await
}

/// An order's steps, in the order they were recorded.
pub(crate) async fn steps_of(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
) -> QueryResult<Vec<Step>> {
    order_steps::table
        .filter(order_steps::order_id.eq(order_id))
        .order(order_steps::step_id)
        .select(Step::as_select())
        .load(conn)
        .await
}

/// When the user's order `order_id` was placed: a page's cursor. None when
/// it is not the user's.
pub(crate) async fn placed_at(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
    order_id: Uuid,
) -> QueryResult<Option<DateTime<Utc>>> {
    orders::table
        .find(order_id)
        .filter(orders::user_id.eq(user_id))
        .select(orders::created_at)
        .first(conn)
        .await
        .optional()
}

/// Up to `limit` of a user's orders, newest first, after the order `after`
/// placed at the given time.
pub(crate) async fn orders_page(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> QueryResult<Vec<OrderRow>> {
    let mut query = orders::table
        .filter(orders::user_id.eq(user_id))
        .order((orders::created_at.desc(), orders::order_id.desc()))
        .select(OrderRow::as_select())
        .limit(limit)
        .into_boxed();
    if let Some((cursor, after)) = after {
        query = query.filter(
            orders::created_at.lt(cursor).or(orders::created_at
                .eq(cursor)
                .and(orders::order_id.lt(after))),
        );
    }
    query.load(conn).await
}

/// The lines of these orders, by order, each in SKU order.
pub(crate) async fn items_of_orders(
    conn: &mut AsyncPgConnection,
    order_ids: &[Uuid],
) -> QueryResult<HashMap<Uuid, Vec<(String, i32)>>> {
    let lines: Vec<(Uuid, String, i32)> = order_items::table
        .filter(order_items::order_id.eq_any(order_ids))
        .order((order_items::order_id, order_items::sku))
        .select((
            order_items::order_id,
            order_items::sku,
            order_items::quantity,
        ))
        .load(conn)
        .await?;
    let mut items_of: HashMap<Uuid, Vec<(String, i32)>> = HashMap::new();
    for (order_id, sku, quantity) in lines {
        items_of.entry(order_id).or_default().push((sku, quantity));
    }
    Ok(items_of)
}

/// The steps of these orders, by order, each in the order recorded.
pub(crate) async fn steps_of_orders(
    conn: &mut AsyncPgConnection,
    order_ids: &[Uuid],
) -> QueryResult<HashMap<Uuid, Vec<Step>>> {
    let steps: Vec<(Uuid, Step)> = order_steps::table
        .filter(order_steps::order_id.eq_any(order_ids))
        .order((order_steps::order_id, order_steps::step_id))
        .select((order_steps::order_id, Step::as_select()))
        .load(conn)
        .await?;
    let mut steps_of: HashMap<Uuid, Vec<Step>> = HashMap::new();
    for (order_id, step) in steps {
        steps_of.entry(order_id).or_default().push(step);
    }
    Ok(steps_of)
}

/// A PENDING order past its deadline.
#[derive(Debug, Clone, Queryable)]
pub(crate) struct Overdue {
    pub(crate) order_id: Uuid,
    pub(crate) user_id: Uuid,
    pub(crate) deadline: DateTime<Utc>,
    pub(crate) placed_at: DateTime<Utc>,
}

/// The earliest deadline of a PENDING order (from the partial index
/// `pending_orders_by_deadline`).
pub(crate) async fn earliest_deadline(
    conn: &mut AsyncPgConnection,
) -> QueryResult<Option<DateTime<Utc>>> {
    orders::table
        .filter(pending())
        .select(diesel::dsl::min(orders::deadline))
        .get_result(conn)
        .await
}

/// PENDING orders, written out rather than bound: a plan made once per
/// connection (the pools force generic plans) then matches the partial
/// index `pending_orders_by_deadline`, which a parameter cannot, and reads
/// only the pending orders however many orders have ended.
fn pending() -> diesel::expression::SqlLiteral<Bool> {
    debug_assert_eq!(Status::Pending.as_str(), "PENDING");
    diesel::dsl::sql::<Bool>("orders.status = 'PENDING'")
}

/// Up to 100 PENDING orders whose deadline is before `now`, locked;
/// the ones another sweeper holds are skipped.
pub(crate) async fn lock_overdue(
    conn: &mut AsyncPgConnection,
    now: DateTime<Utc>,
) -> QueryResult<Vec<Overdue>> {
    orders::table
        .filter(pending())
        .filter(orders::deadline.lt(now))
        .select((
            orders::order_id,
            orders::user_id,
            orders::deadline,
            orders::created_at,
        ))
        .limit(100)
        .for_update()
        .skip_locked()
        .load(conn)
        .await
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
    KeepPrepared(diesel::insert_into(order_steps::table).values(&rows))
        .execute(conn)
        .await
}

/// Marks an order CANCELLED with `reason`.
pub(crate) async fn mark_cancelled(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
    reason: &str,
) -> QueryResult<usize> {
    KeepPrepared(diesel::update(orders::table.find(order_id)).set((
        orders::status.eq(Status::Cancelled.as_str()),
        orders::cancel_reason.eq(reason),
        orders::updated_at.eq(diesel::dsl::now),
    )))
    .execute(conn)
    .await
}

/// Remembers a user, unless known already.
pub(crate) async fn learn_user(conn: &mut AsyncPgConnection, user_id: Uuid) -> QueryResult<usize> {
    diesel::insert_into(known_users::table)
        .values(known_users::user_id.eq(user_id))
        .on_conflict_do_nothing()
        .execute(conn)
        .await
}

/// What a saga event reads of its order.
#[derive(Debug, Clone, Queryable)]
pub(crate) struct SagaRow {
    pub(crate) order_id: Uuid,
    pub(crate) status: String,
    pub(crate) user_id: Uuid,
    pub(crate) deadline: DateTime<Utc>,
    pub(crate) total_cents: i64,
    pub(crate) placed_at: DateTime<Utc>,
}

/// These orders as their saga events need them (read without a lock: the
/// step's statement checks that what it changes is as read, see
/// [`WRITE_MOVES`]).
pub(crate) async fn saga_orders(
    conn: &mut AsyncPgConnection,
    order_ids: &[Uuid],
) -> QueryResult<Vec<SagaRow>> {
    orders::table
        .filter(orders::order_id.eq_any(order_ids))
        .select((
            orders::order_id,
            orders::status,
            orders::user_id,
            orders::deadline,
            orders::total_cents,
            orders::created_at,
        ))
        .load(conn)
        .await
}

/// The orders a batch of saga events changed, column by column, in id
/// order: each one's status and total as they are to be, and as read.
#[derive(Debug, Default)]
pub(crate) struct MovedOrders {
    pub(crate) order_ids: Vec<Uuid>,
    pub(crate) statuses: Vec<&'static str>,
    pub(crate) totals: Vec<i64>,
    pub(crate) cancel_reasons: Vec<Option<String>>,
    /// Whether the status changed (and `updated_at` with it).
    pub(crate) moved: Vec<bool>,
    pub(crate) read_statuses: Vec<&'static str>,
    pub(crate) read_totals: Vec<i64>,
}

/// The steps a batch recorded, column by column, in the order recorded.
#[derive(Debug, Default)]
pub(crate) struct NewSteps {
    pub(crate) order_ids: Vec<Uuid>,
    pub(crate) names: Vec<String>,
    pub(crate) details: Vec<String>,
}

/// The orders a batch changed (`$1`..`$5`: id, status, total, cancel
/// reason or NULL, whether the status changed), each only if it still has
/// the status and total it was read with (`$6`, `$7`), and the steps it
/// recorded (`$8`..`$10`: order, name, detail), in the order recorded; the
/// step's inbox rows (`$11`, `$12`) and events (`$13`).
pub(crate) const WRITE_MOVES: &str = "\
WITH moved_orders AS (
    UPDATE orders SET status = moved.status,
                      total_cents = moved.total_cents,
                      cancel_reason = coalesce(moved.cancel_reason, orders.cancel_reason),
                      updated_at = CASE WHEN moved.moved THEN now() ELSE orders.updated_at END
    FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::bool[],
                $6::text[], $7::bigint[])
         AS moved (order_id, status, total_cents, cancel_reason, moved, read_status, read_total)
    WHERE orders.order_id = moved.order_id
      AND orders.status = moved.read_status AND orders.total_cents = moved.read_total
    RETURNING 1),
checked AS (
    SELECT stale_unless((SELECT count(*) FROM moved_orders) = cardinality($1::uuid[]),
                        'orders changed since they were read')),
steps AS (
    INSERT INTO order_steps (order_id, name, detail)
    SELECT step.order_id, step.name, step.detail
    FROM unnest($8::uuid[], $9::text[], $10::text[]) WITH ORDINALITY
         AS step (order_id, name, detail, position)
    ORDER BY step.position
    RETURNING 1)
SELECT count(*) FROM checked, (SELECT count(*) FROM steps) AS steps,
    inbox_write($11, $12::uuid[]), outbox_write($13::jsonb)";

/// The saga step's one statement, which commits by itself: writes the
/// orders a batch changed, if each is still as read, and the steps it
/// recorded (in this order); else a serialization failure and nothing
/// written. Carries `carried`.
pub(crate) async fn write_moves(
    conn: &mut AsyncPgConnection,
    moved: &MovedOrders,
    steps: &NewSteps,
    carried: &Carried,
) -> QueryResult<usize> {
    KeepPrepared(
        diesel::sql_query(WRITE_MOVES)
            .bind::<Array<SqlUuid>, _>(&moved.order_ids)
            .bind::<Array<Text>, _>(&moved.statuses)
            .bind::<Array<BigInt>, _>(&moved.totals)
            .bind::<Array<Nullable<Text>>, _>(&moved.cancel_reasons)
            .bind::<Array<Bool>, _>(&moved.moved)
            .bind::<Array<Text>, _>(&moved.read_statuses)
            .bind::<Array<BigInt>, _>(&moved.read_totals)
            .bind::<Array<SqlUuid>, _>(&steps.order_ids)
            .bind::<Array<Text>, _>(&steps.names)
            .bind::<Array<Text>, _>(&steps.details)
            .bind::<Text, _>(carried.consumer())
            .bind::<Array<SqlUuid>, _>(carried.event_ids())
            .bind::<Text, _>(carried.events_json()),
    )
    .execute(conn)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn every_statement_written_as_sql_prepares_against_the_migrated_schema() {
        let postgres = shop_test_support::TestPostgres::start().await;
        let url = postgres.create_database("orders").await;
        pg_jetstream::db::migrate(&url, vec![pg_jetstream::MIGRATIONS, crate::MIGRATIONS])
            .await
            .unwrap_or_else(|error| panic!("{error}"));
        shop_test_support::assert_statements_prepare(
            &url,
            &[("PLACE_ORDER", PLACE_ORDER), ("WRITE_MOVES", WRITE_MOVES)],
        )
        .await;
    }

    #[test]
    fn place_order_writes_the_status_and_the_step_the_code_names() {
        assert!(PLACE_ORDER.contains(&format!("'{}'", Status::Pending.as_str())));
        assert!(PLACE_ORDER.contains(&format!("'{PLACED}'")));
    }
}
