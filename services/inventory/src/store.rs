//! Every SQL statement of the inventory service, each once, named after
//! what it does, its parameters bound beside its text, on the connection
//! (or transaction) it is given.

use std::collections::{BTreeMap, HashMap, HashSet};

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use pg_jetstream::consumer::Carried;
use pg_jetstream::db::KeepPrepared;
use shop_domain::{OrderId, limits};
use uuid::Uuid;

use crate::domain::{Line, NewProduct, Status, Stock};
use crate::schema::{products, reservation_lines, reservations};

/// A catalogue entry with its stock.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = products)]
pub(crate) struct Product {
    pub(crate) sku: String,
    pub(crate) name: String,
    pub(crate) price_cents: i64,
    pub(crate) available: i64,
    pub(crate) reserved: i64,
    pub(crate) sold: i64,
}

/// Inserts a product; a SKU taken already is a unique violation.
pub(crate) async fn insert_product(
    conn: &mut AsyncPgConnection,
    product: &NewProduct,
) -> QueryResult<Product> {
    diesel::insert_into(products::table)
        .values((
            products::sku.eq(&product.sku),
            products::name.eq(&product.name),
            products::price_cents.eq(product.price_cents),
            products::available.eq(product.stock),
            products::stocked.eq(product.stock),
        ))
        .returning(Product::as_returning())
        .get_result(conn)
        .await
}

pub(crate) async fn product(
    conn: &mut AsyncPgConnection,
    sku: &str,
) -> QueryResult<Option<Product>> {
    products::table
        .find(sku)
        .select(Product::as_select())
        .first(conn)
        .await
        .optional()
}

/// How many units a product has been stocked with in all.
pub(crate) async fn stocked(conn: &mut AsyncPgConnection, sku: &str) -> QueryResult<Option<i64>> {
    products::table
        .find(sku)
        .select(products::stocked)
        .first(conn)
        .await
        .optional()
}

/// Adds units to a product, only while its units stay within
/// [`limits::MAX_UNITS`]: no row back means no product or a sum past it.
pub(crate) async fn add_stock(
    conn: &mut AsyncPgConnection,
    sku: &str,
    quantity: i64,
) -> QueryResult<Option<Product>> {
    KeepPrepared(
        diesel::update(
            products::table
                .find(sku)
                .filter(products::stocked.le(limits::MAX_UNITS - quantity)),
        )
        .set((
            products::available.eq(products::available + quantity),
            products::stocked.eq(products::stocked + quantity),
        ))
        .returning(Product::as_returning()),
    )
    .get_result(conn)
    .await
    .optional()
}

/// Up to `limit` products in SKU order, after the SKU `after`.
pub(crate) async fn products_after(
    conn: &mut AsyncPgConnection,
    after: Option<&str>,
    limit: i64,
) -> QueryResult<Vec<Product>> {
    let mut query = products::table
        .select(Product::as_select())
        .order(products::sku)
        .limit(limit)
        .into_boxed();
    if let Some(after) = after {
        query = query.filter(products::sku.gt(after.to_owned()));
    }
    query.load(conn).await
}

/// Which of these orders have a reservation row (read without a lock: the
/// step's statement checks it still holds, see [`WRITE_RESERVATIONS`]).
/// Takes a shared connection so that it can be sent with another read in
/// one round trip (diesel-async pipelines what is polled together).
pub(crate) async fn decided(
    mut conn: &AsyncPgConnection,
    order_ids: &[Uuid],
) -> QueryResult<HashSet<OrderId>> {
    Ok(reservations::table
        .filter(reservations::order_id.eq_any(order_ids))
        .select(reservations::order_id)
        .load::<Uuid>(&mut conn)
        .await?
        .into_iter()
        .map(OrderId::from)
        .collect())
}

/// The price and units available of these products (read without a lock,
/// see [`WRITE_RESERVATIONS`]; a shared connection, as [`decided`]).
pub(crate) async fn stock(
    mut conn: &AsyncPgConnection,
    skus: &[&str],
) -> QueryResult<HashMap<String, Stock>> {
    Ok(products::table
        .filter(products::sku.eq_any(skus))
        .select((products::sku, products::price_cents, products::available))
        .load::<(String, i64, i64)>(&mut conn)
        .await?
        .into_iter()
        .map(|(sku, price_cents, available)| {
            (
                sku,
                Stock {
                    price_cents,
                    available,
                },
            )
        })
        .collect())
}

/// Reservations to insert, column by column.
#[derive(Debug, Default)]
pub(crate) struct NewReservations {
    pub(crate) order_ids: Vec<Uuid>,
    pub(crate) user_ids: Vec<Uuid>,
    pub(crate) statuses: Vec<&'static str>,
    pub(crate) totals: Vec<i64>,
    pub(crate) reasons: Vec<String>,
}

impl NewReservations {
    pub(crate) fn push(
        &mut self,
        order_id: Uuid,
        user_id: Uuid,
        status: Status,
        total_cents: i64,
        reason: String,
    ) {
        self.order_ids.push(order_id);
        self.user_ids.push(user_id);
        self.statuses.push(status.as_str());
        self.totals.push(total_cents);
        self.reasons.push(reason);
    }
}

/// Reservation lines to insert, column by column.
#[derive(Debug, Default)]
pub(crate) struct NewLines {
    pub(crate) order_ids: Vec<Uuid>,
    pub(crate) skus: Vec<String>,
    pub(crate) quantities: Vec<i64>,
    pub(crate) unit_prices: Vec<i64>,
}

/// Units taken by SKU (`$1`, `$2`), each only if the SKU still has the
/// units available it was read with (`$3`), the reservations decided
/// (`$4`..`$8`: order, user, status, total, reason) and their lines
/// (`$9`..`$12`: order, SKU, quantity, unit price); the step's inbox rows
/// (`$13`, `$14`) and events (`$15`).
pub(crate) const WRITE_RESERVATIONS: &str = "\
WITH moved AS (
    UPDATE products SET available = available - moved.quantity,
                        reserved = reserved + moved.quantity
    FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS moved (sku, quantity, read)
    WHERE products.sku = moved.sku AND products.available = moved.read
    RETURNING 1),
decided AS (
    INSERT INTO reservations (order_id, user_id, status, total_cents, reason)
    SELECT * FROM unnest($4::uuid[], $5::uuid[], $6::text[], $7::bigint[], $8::text[])
    ON CONFLICT (order_id) DO NOTHING
    RETURNING order_id),
lines AS (
    INSERT INTO reservation_lines (order_id, sku, quantity, unit_price_cents)
    SELECT line.* FROM unnest($9::uuid[], $10::text[], $11::bigint[], $12::bigint[])
        AS line (order_id, sku, quantity, unit_price_cents)
    JOIN decided USING (order_id)
    RETURNING 1),
checked AS (
    SELECT stale_unless(
        (SELECT count(*) FROM moved) = cardinality($1::text[])
        AND (SELECT count(*) FROM decided) = cardinality($4::uuid[]),
        'products or reservations changed since they were read'))
SELECT count(*) FROM checked, (SELECT count(*) FROM lines) AS lines,
    inbox_write($13, $14::uuid[]), outbox_write($15::jsonb)";

/// Units taken by SKU, in SKU order: how many, and how many were available
/// when read.
#[derive(Debug, Default)]
pub(crate) struct Taken {
    pub(crate) skus: Vec<String>,
    pub(crate) quantities: Vec<i64>,
    pub(crate) read: Vec<i64>,
}

/// The reservation's one statement, which commits by itself: moves `taken` from
/// available to reserved if the products still have the units read, and
/// inserts the reservations, if none was decided meanwhile, and their lines
/// (whose reference to their reservation is checked at its end); else a
/// serialization failure and nothing written. Carries `carried`.
pub(crate) async fn write_reservations(
    conn: &mut AsyncPgConnection,
    taken: &Taken,
    reservations: &NewReservations,
    lines: &NewLines,
    carried: &Carried,
) -> QueryResult<usize> {
    KeepPrepared(
        diesel::sql_query(WRITE_RESERVATIONS)
            .bind::<Array<Text>, _>(&taken.skus)
            .bind::<Array<BigInt>, _>(&taken.quantities)
            .bind::<Array<BigInt>, _>(&taken.read)
            .bind::<Array<SqlUuid>, _>(&reservations.order_ids)
            .bind::<Array<SqlUuid>, _>(&reservations.user_ids)
            .bind::<Array<Text>, _>(&reservations.statuses)
            .bind::<Array<BigInt>, _>(&reservations.totals)
            .bind::<Array<Text>, _>(&reservations.reasons)
            .bind::<Array<SqlUuid>, _>(&lines.order_ids)
            .bind::<Array<Text>, _>(&lines.skus)
            .bind::<Array<BigInt>, _>(&lines.quantities)
            .bind::<Array<BigInt>, _>(&lines.unit_prices)
            .bind::<Text, _>(carried.consumer())
            .bind::<Array<SqlUuid>, _>(carried.event_ids())
            .bind::<Text, _>(carried.events_json()),
    )
    .execute(conn)
    .await
}

/// Units released by SKU (`$1`, `$2`) back from reserved to available.
pub(crate) const UNRESERVE: &str = "\
UPDATE products SET reserved = reserved - moved.quantity,
                    available = available + moved.quantity
FROM unnest($1::text[], $2::bigint[]) AS moved (sku, quantity)
WHERE products.sku = moved.sku";

/// Moves `released` (units by SKU) from reserved back to available, in one
/// statement; the table's checks refuse a count below zero.
pub(crate) async fn unreserve(
    conn: &mut AsyncPgConnection,
    released: &BTreeMap<String, i64>,
) -> QueryResult<usize> {
    if released.is_empty() {
        return Ok(0);
    }
    let skus: Vec<&str> = released.keys().map(String::as_str).collect();
    let units: Vec<i64> = released.values().copied().collect();
    KeepPrepared(
        diesel::sql_query(UNRESERVE)
            .bind::<Array<Text>, _>(&skus)
            .bind::<Array<BigInt>, _>(&units),
    )
    .execute(conn)
    .await
}

/// A reservation row with no lines: a rejection or a tombstone.
pub(crate) async fn insert_reservation(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
    user_id: Uuid,
    status: Status,
    reason: &str,
) -> QueryResult<usize> {
    diesel::insert_into(reservations::table)
        .values((
            reservations::order_id.eq(order_id),
            reservations::user_id.eq(user_id),
            reservations::status.eq(status.as_str()),
            reservations::total_cents.eq(0),
            reservations::reason.eq(reason),
        ))
        .execute(conn)
        .await
}

/// An order's reservation status as stored, locked.
pub(crate) async fn lock_status(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
) -> QueryResult<Option<String>> {
    reservations::table
        .find(order_id)
        .select(reservations::status)
        .for_update()
        .first(conn)
        .await
        .optional()
}

/// The reservation statuses of these orders as stored (read without a
/// lock, see [`SELL`]).
pub(crate) async fn statuses(
    conn: &mut AsyncPgConnection,
    order_ids: &[Uuid],
) -> QueryResult<HashMap<Uuid, String>> {
    Ok(reservations::table
        .filter(reservations::order_id.eq_any(order_ids))
        .select((reservations::order_id, reservations::status))
        .load::<(Uuid, String)>(conn)
        .await?
        .into_iter()
        .collect())
}

/// The SKUs of the orders' reservation lines, read without locking.
pub(crate) async fn reserved_skus(
    conn: &mut AsyncPgConnection,
    order_ids: &[Uuid],
) -> QueryResult<Vec<String>> {
    if order_ids.is_empty() {
        return Ok(Vec::new());
    }
    reservation_lines::table
        .filter(reservation_lines::order_id.eq_any(order_ids))
        .select(reservation_lines::sku)
        .distinct()
        .load(conn)
        .await
}

/// Locks the rows of `skus` for the transaction, in SKU order.
pub(crate) async fn lock_products(
    conn: &mut AsyncPgConnection,
    skus: &[String],
) -> QueryResult<usize> {
    if skus.is_empty() {
        return Ok(0);
    }
    let locked: Vec<String> = products::table
        .filter(products::sku.eq_any(skus))
        .order(products::sku)
        .select(products::sku)
        .for_update()
        .load(conn)
        .await?;
    Ok(locked.len())
}

/// An order's reservation lines, in SKU order.
pub(crate) async fn lines_of(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
) -> QueryResult<Vec<Line>> {
    let rows: Vec<(String, i64, i64)> = reservation_lines::table
        .filter(reservation_lines::order_id.eq(order_id))
        .order(reservation_lines::sku)
        .select((
            reservation_lines::sku,
            reservation_lines::quantity,
            reservation_lines::unit_price_cents,
        ))
        .load(conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(sku, quantity, unit_price_cents)| Line {
            sku,
            quantity,
            unit_price_cents,
        })
        .collect())
}

pub(crate) async fn set_status(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
    status: Status,
) -> QueryResult<usize> {
    KeepPrepared(diesel::update(reservations::table.find(order_id)).set((
        reservations::status.eq(status.as_str()),
        reservations::updated_at.eq(diesel::dsl::now),
    )))
    .execute(conn)
    .await
}

/// The reservations of orders `$1` marked `$2` (sold) if they still stand
/// at `$3` (reserved), and their lines' units moved from reserved to sold;
/// the step's inbox rows (`$4`, `$5`) and events (`$6`).
pub(crate) const SELL: &str = "\
WITH sold_orders AS (
    UPDATE reservations SET status = $2, updated_at = now()
    WHERE order_id = ANY($1) AND status = $3
    RETURNING order_id),
moved AS (
    SELECT line.sku, sum(line.quantity)::bigint AS quantity
    FROM reservation_lines AS line JOIN sold_orders USING (order_id)
    GROUP BY line.sku
    ORDER BY line.sku),
sold AS (
    UPDATE products SET reserved = reserved - moved.quantity,
                        sold = sold + moved.quantity
    FROM moved
    WHERE products.sku = moved.sku
    RETURNING 1),
checked AS (
    SELECT stale_unless((SELECT count(*) FROM sold_orders) = cardinality($1::uuid[]),
                        'reservations changed since they were read'))
SELECT count(*) FROM checked, (SELECT count(*) FROM sold) AS sold,
    inbox_write($4, $5::uuid[]), outbox_write($6::jsonb)";

/// The sale's one statement, which commits by itself: marks these
/// reservations (each once) sold if they are all still held, and moves
/// their lines' units from reserved to sold; else a serialization failure
/// and nothing written. Carries `carried`.
pub(crate) async fn sell(
    conn: &mut AsyncPgConnection,
    order_ids: &[Uuid],
    carried: &Carried,
) -> QueryResult<usize> {
    KeepPrepared(
        diesel::sql_query(SELL)
            .bind::<Array<SqlUuid>, _>(order_ids)
            .bind::<Text, _>(Status::Sold.as_str())
            .bind::<Text, _>(Status::Reserved.as_str())
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
        let url = postgres.create_database("inventory").await;
        pg_jetstream::db::migrate(&url, vec![pg_jetstream::MIGRATIONS, crate::MIGRATIONS])
            .await
            .unwrap_or_else(|error| panic!("{error}"));
        shop_test_support::assert_statements_prepare(
            &url,
            &[
                ("WRITE_RESERVATIONS", WRITE_RESERVATIONS),
                ("UNRESERVE", UNRESERVE),
                ("SELL", SELL),
            ],
        )
        .await;
    }
}
