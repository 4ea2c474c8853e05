//! The inventory service's use cases: the catalogue (gRPC) and the saga
//! steps (events), each inside the transaction it is given or opens,
//! deciding with [`crate::domain`] and storing with [`crate::store`].

use std::collections::BTreeMap;

use diesel_async::AsyncPgConnection;
use pg_jetstream::db::PgPool;
use pg_jetstream::{HandlerError, consumer::Carried};
use shop_service::{ApiError, Caller, is_unique_violation, limits, step_failed, unknown_stored};
use uuid::Uuid;

use crate::domain::{self, Line, NewProduct, Placed, Release, Reservation, Status};
use crate::store::{self, NewLines, NewReservations, Product};

/// The catalogue use cases.
#[derive(Clone)]
pub(crate) struct Catalogue {
    pool: PgPool,
}

fn check_sku(sku: &str) -> Result<(), ApiError> {
    domain::check_sku(sku).map_err(ApiError::InvalidArgument)
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
        let product =
            NewProduct::parse(sku, name, price_cents, stock).map_err(ApiError::InvalidArgument)?;
        let mut conn = self.pool.get().await?;
        match store::insert_product(&mut conn, &product).await {
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
        store::product(&mut conn, sku)
            .await?
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
        if let Some(product) = store::add_stock(&mut conn, sku, quantity).await? {
            return Ok(product);
        }
        Err(match store::stocked(&mut conn, sku).await? {
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
        Ok(store::products_after(&mut conn, after, limit).await?)
    }
}

/// The reservation for several orders, decided: what [`reserve`] found and
/// what [`write_reservations`] writes.
#[derive(Debug)]
pub(crate) struct Reservations {
    /// One per order, in the order given.
    pub(crate) decisions: Vec<Reservation>,
    taken: store::Taken,
    reservations: NewReservations,
    lines: NewLines,
}

impl Reservations {
    /// Whether the decisions change anything.
    pub(crate) fn change(&self) -> bool {
        !self.reservations.order_ids.is_empty()
    }
}

/// The reservation for several orders, one after another in the order given,
/// as [`domain::reserve_in_turn`] decides on the products and reservations
/// as read (without locks): [`write_reservations`] writes it only if they
/// are still as read.
pub(crate) async fn reserve(
    conn: &mut AsyncPgConnection,
    orders: &[Placed],
) -> Result<Reservations, HandlerError> {
    let order_ids: Vec<Uuid> = orders.iter().map(|order| order.order_id.get()).collect();
    let mut skus: Vec<&str> = orders
        .iter()
        .flat_map(|order| &order.items)
        .map(|(sku, _)| sku.as_str())
        .collect();
    skus.sort_unstable();
    skus.dedup();
    // Both reads in one round trip.
    let conn: &AsyncPgConnection = conn;
    let (mut decided, mut stock) =
        tokio::try_join!(store::decided(conn, &order_ids), store::stock(conn, &skus))?;
    let read: BTreeMap<String, i64> = stock
        .iter()
        .map(|(sku, product)| (sku.clone(), product.available))
        .collect();
    let decisions = domain::reserve_in_turn(orders, &mut decided, &mut stock);
    let mut taken: BTreeMap<String, i64> = BTreeMap::new();
    let mut reservations = NewReservations::default();
    let mut lines = NewLines::default();
    for (order, decision) in orders.iter().zip(&decisions) {
        match decision {
            Reservation::Reserved {
                lines: reserved,
                total_cents,
            } => {
                for line in reserved {
                    *taken.entry(line.sku.clone()).or_default() += line.quantity;
                    lines.order_ids.push(order.order_id.get());
                    lines.skus.push(line.sku.clone());
                    lines.quantities.push(line.quantity);
                    lines.unit_prices.push(line.unit_price_cents);
                }
                reservations.push(
                    order.order_id.get(),
                    order.user_id.get(),
                    Status::Reserved,
                    *total_cents,
                    String::new(),
                );
            }
            Reservation::Rejected { reason, .. } => reservations.push(
                order.order_id.get(),
                order.user_id.get(),
                Status::Rejected,
                0,
                reason.clone(),
            ),
            Reservation::AlreadyDecided => {}
        }
    }
    // In SKU order, the order every writer takes the products in.
    let mut moved = store::Taken::default();
    for (sku, quantity) in taken {
        let was = read.get(&sku).copied().unwrap_or_default();
        moved.skus.push(sku);
        moved.quantities.push(quantity);
        moved.read.push(was);
    }
    Ok(Reservations {
        decisions,
        taken: moved,
        reservations,
        lines,
    })
}

/// Writes what [`reserve`] decided, with what the step carries, in one
/// statement; a serialization failure if a product or a reservation changed
/// since it was read.
pub(crate) async fn write_reservations(
    conn: &mut AsyncPgConnection,
    decided: &Reservations,
    carried: &Carried,
) -> Result<(), HandlerError> {
    store::write_reservations(
        conn,
        &decided.taken,
        &decided.reservations,
        &decided.lines,
        carried,
    )
    .await?;
    Ok(())
}

/// The sale for several confirmed orders, decided on their reservations
/// as read (without locks): the orders whose reserved units become sold,
/// each once, as [`domain::sell`] decides; [`write_sales`] writes it.
pub(crate) async fn sell(
    conn: &mut AsyncPgConnection,
    order_ids: &[Uuid],
) -> Result<Vec<Uuid>, HandlerError> {
    let statuses = store::statuses(conn, order_ids).await?;
    let mut to_sell = Vec::new();
    for &order_id in order_ids {
        let status = statuses
            .get(&order_id)
            .map(|status| Status::parse(status))
            .transpose()
            .map_err(unknown_stored)?;
        if domain::sell(order_id.into(), status).map_err(step_failed)?
            && !to_sell.contains(&order_id)
        {
            to_sell.push(order_id);
        }
    }
    // In id order, the order every writer takes the reservations in.
    to_sell.sort_unstable();
    Ok(to_sell)
}

/// Writes what [`sell`] decided, with what the step carries, in one
/// statement; a serialization failure if a reservation is no longer held.
pub(crate) async fn write_sales(
    conn: &mut AsyncPgConnection,
    to_sell: &[Uuid],
    carried: &Carried,
) -> Result<(), HandlerError> {
    store::sell(conn, to_sell, carried).await?;
    Ok(())
}

/// The release: give a failed order's reserved units back, as
/// [`domain::release`] decides. Returns the lines released, if any.
pub(crate) async fn release(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
    user_id: Uuid,
) -> Result<Vec<Line>, HandlerError> {
    let status = store::lock_status(conn, order_id)
        .await?
        .map(|status| Status::parse(&status))
        .transpose()
        .map_err(unknown_stored)?;
    match domain::release(order_id.into(), status).map_err(step_failed)? {
        Release::Release => {
            let lines = store::lines_of(conn, order_id).await?;
            let released = lines
                .iter()
                .map(|line| (line.sku.clone(), line.quantity))
                .collect();
            store::unreserve(conn, &released).await?;
            store::set_status(conn, order_id, Status::Released).await?;
            Ok(lines)
        }
        Release::Nothing => Ok(Vec::new()),
        Release::Tombstone => {
            store::insert_reservation(
                conn,
                order_id,
                user_id,
                Status::Cancelled,
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

    use diesel::prelude::*;
    use diesel_async::{AsyncConnection as _, RunQueryDsl};
    use shop_test_support::TestPostgres;

    use super::*;
    use shop_domain::OrderId;

    use crate::schema::{products, reservations};

    /// The reservation as its handler runs it, carrying nothing.
    async fn reserve_and_write(
        conn: &mut AsyncPgConnection,
        orders: &[Placed],
    ) -> Result<Vec<Reservation>, HandlerError> {
        let decided = reserve(conn, orders).await?;
        if decided.change() {
            write_reservations(conn, &decided, &Carried::nothing()).await?;
        }
        Ok(decided.decisions)
    }

    /// The sale as its handler runs it, carrying nothing.
    async fn sell_and_write(
        conn: &mut AsyncPgConnection,
        order_ids: &[Uuid],
    ) -> Result<(), HandlerError> {
        let to_sell = sell(conn, order_ids).await?;
        if !to_sell.is_empty() {
            write_sales(conn, &to_sell, &Carried::nothing()).await?;
        }
        Ok(())
    }

    fn order(sku: &str, quantity: i64) -> Placed {
        Placed {
            order_id: Uuid::now_v7().into(),
            user_id: Uuid::now_v7().into(),
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

    /// A fresh, migrated inventory database, its URL and a connection to it.
    async fn migrated() -> (TestPostgres, String, AsyncPgConnection) {
        let postgres = TestPostgres::start().await;
        let url = postgres.create_database("inventory").await;
        pg_jetstream::db::migrate(&url, vec![pg_jetstream::MIGRATIONS, crate::MIGRATIONS])
            .await
            .unwrap();
        let conn = AsyncPgConnection::establish(&url).await.unwrap();
        (postgres, url, conn)
    }

    /// A compensation batch releases two orders, ZEBRA's and then APPLE's,
    /// while a reservation of both products runs. The batch takes its
    /// products' rows before any release, in SKU order (`lock_names`, as
    /// the consumer calls it for the batch), as the reservation's statement
    /// does: the reservation waits for APPLE instead of holding it while
    /// the batch, holding ZEBRA, waits for it (a deadlock, which PostgreSQL
    /// breaks after `deadlock_timeout` by failing one of them).
    #[tokio::test(flavor = "multi_thread")]
    async fn a_compensation_batch_and_a_reservation_take_products_in_one_order() {
        use pg_jetstream::consumer::LockNames as _;
        use shop_proto::order::v1::OrderCancelled;

        let (_postgres, url, mut conn) = migrated().await;
        let admin = Caller::new("admin", vec![shop_service::roles::ADMIN.into()]);
        let catalogue = Catalogue::new(pg_jetstream::db::pool(&url, 1).unwrap());
        for sku in ["APPLE", "ZEBRA"] {
            catalogue
                .create_product(&admin, sku, sku, 100, 10)
                .await
                .unwrap();
        }
        let (zebra, apple) = (order("ZEBRA", 1), order("APPLE", 1));
        reserve_and_write(&mut conn, &[zebra.clone(), apple.clone()])
            .await
            .unwrap();

        let mut batch = AsyncPgConnection::establish(&url).await.unwrap();
        let (go, mut went) = tokio::sync::mpsc::channel::<()>(1);
        let step = tokio::spawn(async move {
            went.recv().await.unwrap();
            let both = Placed {
                order_id: Uuid::now_v7().into(),
                user_id: Uuid::now_v7().into(),
                items: vec![("APPLE".to_owned(), 1), ("ZEBRA".to_owned(), 1)],
            };
            // As the consumer does: read and decide again while stale.
            loop {
                match reserve_and_write(&mut conn, std::slice::from_ref(&both)).await {
                    Err(error) if error.is_stale() => continue,
                    other => return other.map(|_| ()),
                }
            }
        });
        let released = batch
            .transaction::<_, HandlerError, _>(async |conn| {
                let cancelled: Vec<OrderCancelled> = [&zebra, &apple]
                    .iter()
                    .map(|placed| OrderCancelled {
                        order_id: placed.order_id.to_string(),
                        ..Default::default()
                    })
                    .collect();
                crate::events::HandlerState
                    .lock_names(conn, cancelled.iter().collect())
                    .await?;
                release(conn, zebra.order_id.get(), zebra.user_id.get()).await?;
                // The reservation runs now, and meets the batch's rows.
                go.send(()).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                release(conn, apple.order_id.get(), apple.user_id.get()).await?;
                Ok(())
            })
            .await;
        let reserved = step.await.unwrap();
        assert!(released.is_ok(), "the batch failed: {released:?}");
        assert!(reserved.is_ok(), "the reservation failed: {reserved:?}");
    }

    /// The reservation and the sale read without locks: a decision whose products or
    /// reservations changed before its statement ran is refused whole, as a
    /// serialization failure (the consumer reads and decides again).
    #[tokio::test(flavor = "multi_thread")]
    async fn a_step_decided_on_what_changed_since_writes_nothing() {
        let (_postgres, url, mut conn) = migrated().await;
        let admin = Caller::new("admin", vec![shop_service::roles::ADMIN.into()]);
        let catalogue = Catalogue::new(pg_jetstream::db::pool(&url, 1).unwrap());
        catalogue
            .create_product(&admin, "LAMP", "Lamp", 1999, 3)
            .await
            .unwrap();
        let reservation_count = async |conn: &mut AsyncPgConnection| -> i64 {
            reservations::table.count().get_result(conn).await.unwrap()
        };

        // Stock came in between the read and the write.
        let placed = order("LAMP", 2);
        let decided = reserve(&mut conn, std::slice::from_ref(&placed))
            .await
            .unwrap();
        catalogue.add_stock(&admin, "LAMP", 1).await.unwrap();
        let error = write_reservations(&mut conn, &decided, &Carried::nothing())
            .await
            .unwrap_err();
        assert!(error.is_stale(), "{error}");
        assert_eq!(lamp(&mut conn).await, (4, 0, 0));
        assert_eq!(reservation_count(&mut conn).await, 0);

        // The order was decided meanwhile (a tombstone, another replica).
        let decided = reserve(&mut conn, std::slice::from_ref(&placed))
            .await
            .unwrap();
        store::insert_reservation(
            &mut conn,
            placed.order_id.get(),
            placed.user_id.get(),
            Status::Cancelled,
            "cancelled before it was seen",
        )
        .await
        .unwrap();
        let error = write_reservations(&mut conn, &decided, &Carried::nothing())
            .await
            .unwrap_err();
        assert!(error.is_stale(), "{error}");
        assert_eq!(lamp(&mut conn).await, (4, 0, 0));
        assert_eq!(reservation_count(&mut conn).await, 1);

        // A sale whose reservation was released meanwhile.
        let held = order("LAMP", 1);
        reserve_and_write(&mut conn, std::slice::from_ref(&held))
            .await
            .unwrap();
        let to_sell = sell(&mut conn, &[held.order_id.get()]).await.unwrap();
        release(&mut conn, held.order_id.get(), held.user_id.get())
            .await
            .unwrap();
        let error = write_sales(&mut conn, &to_sell, &Carried::nothing())
            .await
            .unwrap_err();
        assert!(error.is_stale(), "{error}");
        assert_eq!(lamp(&mut conn).await, (4, 0, 0));
    }

    /// Several orders in one call decide as they would one after another:
    /// each sees the stock the ones before it left.
    #[tokio::test(flavor = "multi_thread")]
    async fn orders_reserved_together_take_the_stock_in_turn_and_sell_together() {
        let (_postgres, url, mut conn) = migrated().await;
        Catalogue::new(pg_jetstream::db::pool(&url, 1).unwrap())
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
        let decisions = reserve_and_write(&mut conn, &orders).await.unwrap();
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
        let decisions = reserve_and_write(&mut conn, &orders).await.unwrap();
        assert!(
            decisions
                .iter()
                .all(|decision| matches!(decision, Reservation::AlreadyDecided))
        );

        let sold = [orders[0].order_id, orders[2].order_id, orders[0].order_id].map(OrderId::get);
        sell_and_write(&mut conn, &sold).await.unwrap();
        assert_eq!(lamp(&mut conn).await, (0, 0, 3));
        // Sold already: nothing moves again.
        sell_and_write(&mut conn, &sold).await.unwrap();
        assert_eq!(lamp(&mut conn).await, (0, 0, 3));
        // A rejected order cannot be sold, and the call changes nothing.
        let error = sell_and_write(&mut conn, &[orders[1].order_id.get()])
            .await
            .unwrap_err();
        assert!(
            matches!(&error, HandlerError::Permanent(reason) if reason.ends_with("its reservation is REJECTED")),
            "{error}"
        );
        let statuses: Vec<String> = reservations::table
            .filter(reservations::order_id.eq_any(orders.iter().map(|order| order.order_id.get())))
            .order(reservations::order_id)
            .select(reservations::status)
            .load(&mut conn)
            .await
            .unwrap();
        assert_eq!(statuses, ["SOLD", "REJECTED", "SOLD", "REJECTED"]);
    }
}
