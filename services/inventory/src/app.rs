//! The inventory service's use cases: the catalogue (gRPC) and the saga
//! steps (events), each inside the transaction it is given or opens.

use std::collections::{BTreeMap, HashMap, HashSet};

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use shop_db::{Cached, PgPool};
use shop_messaging::HandlerError;
use shop_service::{ApiError, Caller, is_unique_violation, limits};
use uuid::Uuid;

use crate::domain::{self, Line, Status, Stock};
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

/// The catalogue use cases.
#[derive(Clone)]
pub(crate) struct Catalogue {
    pool: PgPool,
}

fn check_sku(sku: &str) -> Result<(), ApiError> {
    match sku.chars().count() {
        0 => Err(ApiError::InvalidArgument("sku is required".into())),
        n if n > 64 => Err(ApiError::InvalidArgument(format!(
            "sku must be at most 64 characters, got {n}"
        ))),
        _ if sku.trim() != sku => Err(ApiError::InvalidArgument(
            "sku must not start or end with spaces".into(),
        )),
        _ if sku.contains('\0') => Err(ApiError::InvalidArgument(
            "sku must not contain NUL characters".into(),
        )),
        _ => Ok(()),
    }
}

impl Catalogue {
    pub(crate) fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// A new product with its first stock: the catalogue is the shop's to
    /// change, not its customers'.
    pub(crate) async fn create_product(
        &self,
        caller: &Caller,
        sku: &str,
        name: &str,
        price_cents: i64,
        stock: i64,
    ) -> Result<Product, ApiError> {
        caller.require_role("CreateProduct", &[])?;
        check_sku(sku)?;
        let name = name.trim();
        if name.contains('\0') {
            return Err(ApiError::InvalidArgument(
                "name must not contain NUL characters".into(),
            ));
        }
        if name.is_empty() || name.chars().count() > 200 {
            return Err(ApiError::InvalidArgument(
                "name must be 1 to 200 characters".into(),
            ));
        }
        if !(0..=limits::MAX_PRICE_CENTS).contains(&price_cents) {
            return Err(ApiError::InvalidArgument(format!(
                "price_cents must be 0 to {}, got {price_cents}",
                limits::MAX_PRICE_CENTS
            )));
        }
        if !(0..=limits::MAX_UNITS).contains(&stock) {
            return Err(ApiError::InvalidArgument(format!(
                "stock must be 0 to {}, got {stock}",
                limits::MAX_UNITS
            )));
        }
        let mut conn = self.pool.get().await?;
        let result = diesel::insert_into(products::table)
            .values((
                products::sku.eq(sku),
                products::name.eq(name),
                products::price_cents.eq(price_cents),
                products::available.eq(stock),
                products::stocked.eq(stock),
            ))
            .returning(Product::as_returning())
            .get_result(&mut conn)
            .await;
        match result {
            Ok(product) => Ok(product),
            Err(error) if is_unique_violation(&error) => Err(ApiError::AlreadyExists(format!(
                "product {sku} exists already"
            ))),
            Err(error) => Err(error.into()),
        }
    }

    /// A product; any authenticated caller may read the catalogue.
    pub(crate) async fn get_product(&self, sku: &str) -> Result<Product, ApiError> {
        check_sku(sku)?;
        let mut conn = self.pool.get().await?;
        products::table
            .find(sku)
            .select(Product::as_select())
            .first(&mut conn)
            .await
            .optional()?
            .ok_or_else(|| ApiError::NotFound(format!("no product {sku}")))
    }

    /// More units of a product.
    pub(crate) async fn add_stock(
        &self,
        caller: &Caller,
        sku: &str,
        quantity: i64,
    ) -> Result<Product, ApiError> {
        caller.require_role("AddStock", &[])?;
        check_sku(sku)?;
        if !(1..=limits::MAX_UNITS).contains(&quantity) {
            return Err(ApiError::InvalidArgument(format!(
                "quantity must be 1 to {}, got {quantity}",
                limits::MAX_UNITS
            )));
        }
        let mut conn = self.pool.get().await?;
        // Only while the product's units stay within the limit; no row
        // back means no product or a sum past it.
        let added = Cached(
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
        .get_result(&mut conn)
        .await
        .optional()?;
        if let Some(product) = added {
            return Ok(product);
        }
        let stocked: Option<i64> = products::table
            .find(sku)
            .select(products::stocked)
            .first(&mut conn)
            .await
            .optional()?;
        Err(match stocked {
            None => ApiError::NotFound(format!("no product {sku}")),
            Some(stocked) => ApiError::OutOfRange(format!(
                "{sku} has been stocked with {stocked} units; {quantity} more would pass the limit of {}",
                limits::MAX_UNITS
            )),
        })
    }

    pub(crate) async fn list_products(
        &self,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Product>, ApiError> {
        // A token this service gave out is a SKU.
        if let Some(after) = after
            && check_sku(after).is_err()
        {
            return Err(ApiError::InvalidArgument(
                "page_token is not one this service gave out".into(),
            ));
        }
        let mut conn = self.pool.get().await?;
        let mut query = products::table
            .select(Product::as_select())
            .order(products::sku)
            .limit(limit)
            .into_boxed();
        if let Some(after) = after {
            query = query.filter(products::sku.gt(after.to_owned()));
        }
        Ok(query.load(&mut conn).await?)
    }
}

/// What a reservation attempt decided.
pub(crate) enum Reservation {
    /// Every line reserved.
    Reserved { lines: Vec<Line>, total_cents: i64 },
    /// Nothing reserved.
    Rejected { sku: String, reason: String },
    /// The order was seen before (a redelivery under another id, or a
    /// cancellation that overtook it): nothing to do.
    AlreadyDecided,
}

/// An `order.placed` to reserve for.
pub(crate) struct Placed {
    pub(crate) order_id: Uuid,
    pub(crate) user_id: Uuid,
    pub(crate) items: Vec<(String, i64)>,
}

/// Saga step 2 for several orders, one after another in the order given:
/// each reserves all its lines or none, from the stock the orders before it
/// left. A few statements whatever the number of orders.
pub(crate) async fn reserve(
    conn: &mut AsyncPgConnection,
    orders: &[Placed],
) -> Result<Vec<Reservation>, HandlerError> {
    let order_ids: Vec<Uuid> = orders.iter().map(|order| order.order_id).collect();
    let mut decided: HashSet<Uuid> = Cached(
        reservations::table
            .filter(reservations::order_id.eq_any(&order_ids))
            .select(reservations::order_id)
            .for_update(),
    )
    .load(conn)
    .await?
    .into_iter()
    .collect();
    let mut skus: Vec<&str> = orders
        .iter()
        .flat_map(|order| &order.items)
        .map(|(sku, _)| sku.as_str())
        .collect();
    skus.sort_unstable();
    skus.dedup();
    // Locked in SKU order, so concurrent transactions never deadlock.
    let mut stock: HashMap<String, Stock> = Cached(
        products::table
            .filter(products::sku.eq_any(&skus))
            .order(products::sku)
            .select((products::sku, products::price_cents, products::available))
            .for_update(),
    )
    .load::<(String, i64, i64)>(conn)
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
    .collect();
    let mut taken: BTreeMap<String, i64> = BTreeMap::new();
    let mut new_reservations = NewReservations::default();
    let mut new_lines = NewLines::default();
    let mut decisions = Vec::with_capacity(orders.len());
    for order in orders {
        // Seen before (a redelivery under another id, or a cancellation that
        // overtook it), or earlier in this batch.
        if !decided.insert(order.order_id) {
            decisions.push(Reservation::AlreadyDecided);
            continue;
        }
        match domain::reserve(&order.items, &stock) {
            Ok((lines, total_cents)) => {
                for line in &lines {
                    if let Some(product) = stock.get_mut(&line.sku) {
                        product.available -= line.quantity;
                    }
                    *taken.entry(line.sku.clone()).or_default() += line.quantity;
                    new_lines.order_ids.push(order.order_id);
                    new_lines.skus.push(line.sku.clone());
                    new_lines.quantities.push(line.quantity);
                    new_lines.unit_prices.push(line.unit_price_cents);
                }
                new_reservations.push(order, Status::Reserved, total_cents, String::new());
                decisions.push(Reservation::Reserved { lines, total_cents });
            }
            Err(rejection) => {
                new_reservations.push(order, Status::Rejected, 0, rejection.reason.clone());
                decisions.push(Reservation::Rejected {
                    sku: rejection.sku,
                    reason: rejection.reason,
                });
            }
        }
    }
    if new_reservations.order_ids.is_empty() {
        return Ok(decisions);
    }
    // The units, the reservations and their lines in one statement (the
    // lines' reference to their reservation is checked at its end).
    let (skus, units): (Vec<&str>, Vec<i64>) = taken
        .iter()
        .map(|(sku, units)| (sku.as_str(), *units))
        .unzip();
    Cached(
        diesel::sql_query(format!(
            "WITH moved AS ({}), \
             decided AS (INSERT INTO reservations (order_id, user_id, status, total_cents, reason) \
             SELECT * FROM unnest($3::uuid[], $4::uuid[], $5::text[], $6::bigint[], $7::text[])) \
             INSERT INTO reservation_lines (order_id, sku, quantity, unit_price_cents) \
             SELECT * FROM unnest($8::uuid[], $9::text[], $10::bigint[], $11::bigint[])",
            Shift::Reserve.statement()
        ))
        .bind::<Array<Text>, _>(&skus)
        .bind::<Array<BigInt>, _>(&units)
        .bind::<Array<SqlUuid>, _>(&new_reservations.order_ids)
        .bind::<Array<SqlUuid>, _>(&new_reservations.user_ids)
        .bind::<Array<Text>, _>(&new_reservations.statuses)
        .bind::<Array<BigInt>, _>(&new_reservations.totals)
        .bind::<Array<Text>, _>(&new_reservations.reasons)
        .bind::<Array<SqlUuid>, _>(&new_lines.order_ids)
        .bind::<Array<Text>, _>(&new_lines.skus)
        .bind::<Array<BigInt>, _>(&new_lines.quantities)
        .bind::<Array<BigInt>, _>(&new_lines.unit_prices),
    )
    .execute(conn)
    .await?;
    Ok(decisions)
}

/// Reservations to insert, column by column.
#[derive(Default)]
struct NewReservations {
    order_ids: Vec<Uuid>,
    user_ids: Vec<Uuid>,
    statuses: Vec<&'static str>,
    totals: Vec<i64>,
    reasons: Vec<String>,
}

impl NewReservations {
    fn push(&mut self, order: &Placed, status: Status, total_cents: i64, reason: String) {
        self.order_ids.push(order.order_id);
        self.user_ids.push(order.user_id);
        self.statuses.push(status.as_str());
        self.totals.push(total_cents);
        self.reasons.push(reason);
    }
}

/// Reservation lines to insert, column by column.
#[derive(Default)]
struct NewLines {
    order_ids: Vec<Uuid>,
    skus: Vec<String>,
    quantities: Vec<i64>,
    unit_prices: Vec<i64>,
}

/// Where units move between a product's counts.
#[derive(Debug, Clone, Copy)]
enum Shift {
    /// available -> reserved
    Reserve,
    /// reserved -> available
    Release,
}

impl Shift {
    fn statement(self) -> &'static str {
        match self {
            Self::Reserve => {
                "UPDATE products SET available = available - moved.quantity, \
                 reserved = reserved + moved.quantity \
                 FROM unnest($1::text[], $2::bigint[]) AS moved (sku, quantity) \
                 WHERE products.sku = moved.sku"
            }
            Self::Release => {
                "UPDATE products SET reserved = reserved - moved.quantity, \
                 available = available + moved.quantity \
                 FROM unnest($1::text[], $2::bigint[]) AS moved (sku, quantity) \
                 WHERE products.sku = moved.sku"
            }
        }
    }
}

/// Moves `quantities` (units by SKU) between the products' counts, in one
/// statement; the table's checks refuse a count below zero.
async fn shift(
    conn: &mut AsyncPgConnection,
    shift: Shift,
    quantities: &BTreeMap<String, i64>,
) -> QueryResult<()> {
    if quantities.is_empty() {
        return Ok(());
    }
    let skus: Vec<&str> = quantities.keys().map(String::as_str).collect();
    let units: Vec<i64> = quantities.values().copied().collect();
    Cached(
        diesel::sql_query(shift.statement())
            .bind::<Array<Text>, _>(&skus)
            .bind::<Array<BigInt>, _>(&units),
    )
    .execute(conn)
    .await?;
    Ok(())
}

async fn insert_reservation(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
    user_id: Uuid,
    status: Status,
    total_cents: i64,
    reason: &str,
) -> QueryResult<usize> {
    diesel::insert_into(reservations::table)
        .values((
            reservations::order_id.eq(order_id),
            reservations::user_id.eq(user_id),
            reservations::status.eq(status.as_str()),
            reservations::total_cents.eq(total_cents),
            reservations::reason.eq(reason),
        ))
        .execute(conn)
        .await
}

async fn locked_status(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
) -> Result<Option<Status>, HandlerError> {
    let status: Option<String> = reservations::table
        .find(order_id)
        .select(reservations::status)
        .for_update()
        .first(conn)
        .await
        .optional()?;
    status
        .map(|status| {
            Status::parse(&status).ok_or_else(|| {
                HandlerError::permanent(format!("unknown reservation status {status}"))
            })
        })
        .transpose()
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

async fn lines_of(conn: &mut AsyncPgConnection, order_id: Uuid) -> QueryResult<Vec<Line>> {
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

async fn set_status(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
    status: Status,
) -> QueryResult<usize> {
    Cached(diesel::update(reservations::table.find(order_id)).set((
        reservations::status.eq(status.as_str()),
        reservations::updated_at.eq(diesel::dsl::now),
    )))
    .execute(conn)
    .await
}

/// Saga step 5 for several confirmed orders: their reserved units become
/// sold, in a few statements whatever their number.
pub(crate) async fn sell(
    conn: &mut AsyncPgConnection,
    order_ids: &[Uuid],
) -> Result<(), HandlerError> {
    let statuses: HashMap<Uuid, String> = Cached(
        reservations::table
            .filter(reservations::order_id.eq_any(order_ids))
            .select((reservations::order_id, reservations::status))
            .for_update(),
    )
    .load::<(Uuid, String)>(conn)
    .await?
    .into_iter()
    .collect();
    let mut to_sell = Vec::new();
    for &order_id in order_ids {
        let status = statuses.get(&order_id).map(|status| {
            Status::parse(status).ok_or_else(|| {
                HandlerError::permanent(format!("unknown reservation status {status}"))
            })
        });
        match status.transpose()? {
            Some(Status::Reserved) if !to_sell.contains(&order_id) => to_sell.push(order_id),
            Some(Status::Reserved | Status::Sold) => {}
            Some(other) => {
                return Err(HandlerError::permanent(format!(
                    "order {order_id} confirmed, but its reservation is {}",
                    other.as_str()
                )));
            }
            // The reservation is this service's own doing and comes first;
            // until it is visible, retry.
            None => {
                return Err(HandlerError::transient(format!(
                    "no reservation for confirmed order {order_id} yet"
                )));
            }
        }
    }
    if to_sell.is_empty() {
        return Ok(());
    }
    // The reservations marked sold and their lines' units moved, in one
    // statement.
    Cached(
        diesel::sql_query(
            "WITH sold_orders AS (UPDATE reservations SET status = $2, updated_at = now() \
             WHERE order_id = ANY($1) RETURNING order_id), \
             moved AS (SELECT line.sku, sum(line.quantity)::bigint AS quantity \
             FROM reservation_lines AS line JOIN sold_orders USING (order_id) GROUP BY line.sku) \
             UPDATE products SET reserved = reserved - moved.quantity, \
             sold = sold + moved.quantity FROM moved WHERE products.sku = moved.sku",
        )
        .bind::<Array<SqlUuid>, _>(&to_sell)
        .bind::<Text, _>(Status::Sold.as_str()),
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Compensation c2: give a failed order's reserved units back. Returns the
/// lines released, if any. An order not seen yet gets a tombstone, so that
/// its late `order.placed` reserves nothing.
pub(crate) async fn release(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
    user_id: Uuid,
) -> Result<Vec<Line>, HandlerError> {
    match locked_status(conn, order_id).await? {
        Some(Status::Reserved) => {
            let lines = lines_of(conn, order_id).await?;
            let released = lines
                .iter()
                .map(|line| (line.sku.clone(), line.quantity))
                .collect();
            shift(conn, Shift::Release, &released).await?;
            set_status(conn, order_id, Status::Released).await?;
            Ok(lines)
        }
        Some(Status::Sold) => Err(HandlerError::permanent(format!(
            "order {order_id} is sold; a release cannot undo a confirmed order"
        ))),
        Some(Status::Rejected | Status::Released | Status::Cancelled) => Ok(Vec::new()),
        None => {
            insert_reservation(
                conn,
                order_id,
                user_id,
                Status::Cancelled,
                0,
                "cancelled before it was seen",
            )
            .await?;
            Ok(Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use diesel_async::AsyncConnection as _;
    use shop_test_support::TestPostgres;

    use super::*;

    fn order(sku: &str, quantity: i64) -> Placed {
        Placed {
            order_id: Uuid::now_v7(),
            user_id: Uuid::now_v7(),
            items: vec![(sku.to_owned(), quantity)],
        }
    }

    async fn lamp(conn: &mut AsyncPgConnection) -> (i64, i64, i64) {
        products::table
            .find("LAMP")
            .select((products::available, products::reserved, products::sold))
            .get_result(conn)
            .await
            .unwrap()
    }

    /// Several orders in one call decide as they would one after another:
    /// each sees the stock the ones before it left.
    #[tokio::test(flavor = "multi_thread")]
    async fn orders_reserved_together_take_the_stock_in_turn_and_sell_together() {
        let postgres = TestPostgres::start().await;
        let url = postgres.create_database("inventory").await;
        shop_db::migrate(&url, vec![shop_messaging::MIGRATIONS, crate::MIGRATIONS])
            .await
            .unwrap();
        let mut conn = AsyncPgConnection::establish(&url).await.unwrap();
        Catalogue::new(shop_db::pool(&url, 1).unwrap())
            .create_product(
                &Caller::new("admin", vec![shop_service::roles::ADMIN.into()]),
                "LAMP",
                "Lamp",
                1999,
                3,
            )
            .await
            .unwrap();

        let first = order("LAMP", 2);
        let too_many = order("LAMP", 2);
        let last = order("LAMP", 1);
        let again = Placed {
            items: vec![("LAMP".into(), 1)],
            ..first
        };
        let unknown = order("NOPE", 1);
        let orders = [first, too_many, last, again, unknown];
        let decisions = reserve(&mut conn, &orders).await.unwrap();
        let summary: Vec<String> = decisions
            .iter()
            .map(|decision| match decision {
                Reservation::Reserved { total_cents, .. } => format!("reserved {total_cents}"),
                Reservation::Rejected { reason, .. } => reason.clone(),
                Reservation::AlreadyDecided => "already decided".into(),
            })
            .collect();
        assert_eq!(
            summary,
            [
                "reserved 3998",
                "out of stock: LAMP has 1 available, 2 wanted",
                "reserved 1999",
                "already decided",
                "unknown SKU NOPE",
            ]
        );
        assert_eq!(lamp(&mut conn).await, (0, 3, 0));
        // A redelivery of the whole batch decides nothing new.
        let decisions = reserve(&mut conn, &orders).await.unwrap();
        assert!(
            decisions
                .iter()
                .all(|decision| matches!(decision, Reservation::AlreadyDecided))
        );

        let sold = [orders[0].order_id, orders[2].order_id, orders[0].order_id];
        sell(&mut conn, &sold).await.unwrap();
        assert_eq!(lamp(&mut conn).await, (0, 0, 3));
        // Sold already: nothing moves again.
        sell(&mut conn, &sold).await.unwrap();
        assert_eq!(lamp(&mut conn).await, (0, 0, 3));
        // A rejected order cannot be sold, and the call changes nothing.
        let error = sell(&mut conn, &[orders[1].order_id]).await.unwrap_err();
        assert!(
            matches!(&error, HandlerError::Permanent(reason) if reason.ends_with("its reservation is REJECTED")),
            "{error}"
        );
        let statuses: Vec<String> = reservations::table
            .filter(reservations::order_id.eq_any(orders.iter().map(|order| order.order_id)))
            .order(reservations::order_id)
            .select(reservations::status)
            .load(&mut conn)
            .await
            .unwrap();
        assert_eq!(statuses, ["SOLD", "REJECTED", "SOLD", "REJECTED"]);
    }
}
