//! The inventory service's use cases: the catalogue (gRPC) and the saga
//! steps (events), each inside the transaction it is given or opens.

use std::collections::HashMap;

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use shop_db::{Cached, PgPool};
use shop_messaging::HandlerError;
use shop_service::{ApiError, is_unique_violation};
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
        _ => Ok(()),
    }
}

impl Catalogue {
    pub(crate) fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub(crate) async fn create_product(
        &self,
        sku: &str,
        name: &str,
        price_cents: i64,
        stock: i64,
    ) -> Result<Product, ApiError> {
        check_sku(sku)?;
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 200 {
            return Err(ApiError::InvalidArgument(
                "name must be 1 to 200 characters".into(),
            ));
        }
        if price_cents < 0 {
            return Err(ApiError::InvalidArgument(format!(
                "price_cents must not be negative, got {price_cents}"
            )));
        }
        if stock < 0 {
            return Err(ApiError::InvalidArgument(format!(
                "stock must not be negative, got {stock}"
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

    pub(crate) async fn add_stock(&self, sku: &str, quantity: i64) -> Result<Product, ApiError> {
        check_sku(sku)?;
        if quantity < 1 {
            return Err(ApiError::InvalidArgument(format!(
                "quantity must be at least 1, got {quantity}"
            )));
        }
        let mut conn = self.pool.get().await?;
        Cached(
            diesel::update(products::table.find(sku))
                .set((
                    products::available.eq(products::available + quantity),
                    products::stocked.eq(products::stocked + quantity),
                ))
                .returning(Product::as_returning()),
        )
        .get_result(&mut conn)
        .await
        .optional()?
        .ok_or_else(|| ApiError::NotFound(format!("no product {sku}")))
    }

    pub(crate) async fn list_products(
        &self,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Product>, ApiError> {
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

/// Saga step 2: reserve all lines or none.
pub(crate) async fn reserve(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
    user_id: Uuid,
    items: &[(String, i64)],
) -> Result<Reservation, HandlerError> {
    let seen: Option<String> = reservations::table
        .find(order_id)
        .select(reservations::status)
        .for_update()
        .first(conn)
        .await
        .optional()?;
    if seen.is_some() {
        return Ok(Reservation::AlreadyDecided);
    }
    let skus: Vec<&str> = items.iter().map(|(sku, _)| sku.as_str()).collect();
    // Locked in SKU order, so concurrent orders never deadlock.
    let stock: HashMap<String, Stock> = products::table
        .filter(products::sku.eq_any(&skus))
        .order(products::sku)
        .select((products::sku, products::price_cents, products::available))
        .for_update()
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
    match domain::reserve(items, &stock) {
        Ok((lines, total_cents)) => {
            for line in &lines {
                Cached(diesel::update(products::table.find(&line.sku)).set((
                    products::available.eq(products::available - line.quantity),
                    products::reserved.eq(products::reserved + line.quantity),
                )))
                .execute(conn)
                .await?;
            }
            insert_reservation(conn, order_id, user_id, Status::Reserved, total_cents, "").await?;
            let rows: Vec<_> = lines
                .iter()
                .map(|line| {
                    (
                        reservation_lines::order_id.eq(order_id),
                        reservation_lines::sku.eq(&line.sku),
                        reservation_lines::quantity.eq(line.quantity),
                        reservation_lines::unit_price_cents.eq(line.unit_price_cents),
                    )
                })
                .collect();
            Cached(diesel::insert_into(reservation_lines::table).values(&rows))
                .execute(conn)
                .await?;
            Ok(Reservation::Reserved { lines, total_cents })
        }
        Err(rejection) => {
            insert_reservation(
                conn,
                order_id,
                user_id,
                Status::Rejected,
                0,
                &rejection.reason,
            )
            .await?;
            Ok(Reservation::Rejected {
                sku: rejection.sku,
                reason: rejection.reason,
            })
        }
    }
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

/// Saga step 5: the reserved units of a confirmed order become sold.
pub(crate) async fn sell(conn: &mut AsyncPgConnection, order_id: Uuid) -> Result<(), HandlerError> {
    match locked_status(conn, order_id).await? {
        Some(Status::Reserved) => {
            for line in lines_of(conn, order_id).await? {
                Cached(diesel::update(products::table.find(&line.sku)).set((
                    products::reserved.eq(products::reserved - line.quantity),
                    products::sold.eq(products::sold + line.quantity),
                )))
                .execute(conn)
                .await?;
            }
            set_status(conn, order_id, Status::Sold).await?;
            Ok(())
        }
        Some(Status::Sold) => Ok(()),
        Some(other) => Err(HandlerError::permanent(format!(
            "order {order_id} confirmed, but its reservation is {}",
            other.as_str()
        ))),
        // The reservation is this service's own doing and comes first; until
        // it is visible, retry.
        None => Err(HandlerError::transient(format!(
            "no reservation for confirmed order {order_id} yet"
        ))),
    }
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
            for line in &lines {
                Cached(diesel::update(products::table.find(&line.sku)).set((
                    products::reserved.eq(products::reserved - line.quantity),
                    products::available.eq(products::available + line.quantity),
                )))
                .execute(conn)
                .await?;
            }
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
