//! The event adapter: a routing table from event to saga step.
//!
//! | consumes | does | emits |
//! |---|---|---|
//! | `order.placed` | reserve all lines or none | `inventory.reserved` or `inventory.rejected` |
//! | `order.confirmed` | reserved -> sold | - |
//! | `payment.failed`, `order.cancelled` | release the reservation, or leave a tombstone | `inventory.released` |

use diesel::QueryResult;
use diesel_async::AsyncPgConnection;
use pg_jetstream::consumer::uuid_field as id;
use pg_jetstream::{
    Context, Handler, HandlerError, Route, Router,
    consumer::{LockNames, Statement, StatementHandler},
};
use shop_proto::Event;
use shop_proto::inventory::v1::{
    InventoryRejected, InventoryReleased, InventoryReserved, ReservedLine,
};
use shop_proto::order::v1::{OrderCancelled, OrderConfirmed, OrderPlaced};
use shop_proto::payment::v1::PaymentFailed;

use crate::domain::{Line, Placed, Reservation};
use crate::{app, store};

/// What the handlers share; the database comes with each event (its
/// transaction, or its statement's connection).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HandlerState;

/// The routes for events on the `ORDER` stream.
///
/// Reservations and sales read the products and reservations without
/// locks and write them once, if unchanged (see
/// [`Route::in_one_statement`]). Releases name the products they give
/// back, so that they lock them in one order (see [`Route::locking`]).
pub(crate) fn order_events() -> Router<HandlerState> {
    Router::new()
        .on::<OrderPlaced>(Route::in_one_statement())
        .on::<OrderConfirmed>(Route::in_one_statement())
        .on::<OrderCancelled>(Route::single().locking())
}

/// The routes for events on the `PAYMENT` stream.
pub(crate) fn payment_events() -> Router<HandlerState> {
    Router::new().on::<PaymentFailed>(Route::single().locking())
}

fn product_lock(sku: &str) -> String {
    format!("product:{sku}")
}

/// The events that end a reservation, named by its order.
trait EndsReservation {
    fn order_id(&self) -> &str;
}

impl EndsReservation for OrderCancelled {
    fn order_id(&self) -> &str {
        &self.order_id
    }
}

impl EndsReservation for PaymentFailed {
    fn order_id(&self) -> &str {
        &self.order_id
    }
}

/// The products the events' orders hold reserved, in one query (none for a
/// malformed id: its handler reports that), their rows locked.
impl<E: Event + EndsReservation> LockNames<E> for HandlerState {
    async fn lock_names(
        &self,
        conn: &mut AsyncPgConnection,
        events: Vec<&E>,
    ) -> QueryResult<Vec<String>> {
        let order_ids: Vec<uuid::Uuid> = events
            .iter()
            .filter_map(|event| uuid::Uuid::parse_str(event.order_id()).ok())
            .collect();
        let skus = store::reserved_skus(conn, &order_ids).await?;
        // The product rows too, now and in SKU order, as the reservations'
        // one statement takes them: a release taking them as it goes, in
        // the batch's order, could hold one that a reservation waits for
        // while waiting for one that reservation holds.
        store::lock_products(conn, &skus).await?;
        Ok(skus.iter().map(|sku| product_lock(sku)).collect())
    }
}

fn to_proto(lines: &[Line]) -> Vec<ReservedLine> {
    lines
        .iter()
        .map(|line| ReservedLine {
            sku: line.sku.clone(),
            quantity: line.quantity,
            unit_price_cents: line.unit_price_cents,
        })
        .collect()
}

/// Reserves all of each order's lines, or none, in one statement.
impl StatementHandler<OrderPlaced> for HandlerState {
    async fn handle_in_statement(
        &self,
        step: &mut Statement<'_>,
        events: Vec<OrderPlaced>,
    ) -> Result<(), HandlerError> {
        let orders = events
            .iter()
            .map(|event| {
                Ok(Placed {
                    order_id: id("order_id", &event.order_id)?.into(),
                    user_id: id("user_id", &event.user_id)?.into(),
                    items: event
                        .items
                        .iter()
                        .map(|item| (item.sku.clone(), i64::from(item.quantity)))
                        .collect(),
                })
            })
            .collect::<Result<Vec<_>, HandlerError>>()?;
        let decided = app::reserve(step.conn(), &orders).await?;
        if !decided.change() {
            return Ok(());
        }
        for (index, (event, decision)) in events.into_iter().zip(&decided.decisions).enumerate() {
            match decision {
                Reservation::Reserved { lines, total_cents } => step.emit(
                    index,
                    &InventoryReserved {
                        order_id: event.order_id,
                        user_id: event.user_id,
                        total_cents: *total_cents,
                        lines: to_proto(lines),
                    },
                ),
                Reservation::Rejected { sku, reason } => step.emit(
                    index,
                    &InventoryRejected {
                        order_id: event.order_id,
                        user_id: event.user_id,
                        reason: reason.clone(),
                        sku: sku.clone(),
                    },
                ),
                Reservation::AlreadyDecided => {}
            }
        }
        let carried = step.carry();
        app::write_reservations(step.conn(), &decided, &carried).await
    }
}

/// Reserved -> sold, in one statement.
impl StatementHandler<OrderConfirmed> for HandlerState {
    async fn handle_in_statement(
        &self,
        step: &mut Statement<'_>,
        events: Vec<OrderConfirmed>,
    ) -> Result<(), HandlerError> {
        let order_ids = events
            .iter()
            .map(|event| id("order_id", &event.order_id))
            .collect::<Result<Vec<_>, _>>()?;
        let to_sell = app::sell(step.conn(), &order_ids).await?;
        if to_sell.is_empty() {
            return Ok(());
        }
        let carried = step.carry();
        app::write_sales(step.conn(), &to_sell, &carried).await
    }
}

/// Releases the reservation, or leaves a tombstone.
async fn release(
    cx: &mut Context<'_>,
    order_id: String,
    user_id: String,
) -> Result<(), HandlerError> {
    let lines = app::release(
        cx.conn(),
        id("order_id", &order_id)?,
        id("user_id", &user_id)?,
    )
    .await?;
    if !lines.is_empty() {
        cx.emit(&InventoryReleased {
            order_id,
            user_id,
            lines: to_proto(&lines),
        });
    }
    Ok(())
}

impl Handler<OrderCancelled> for HandlerState {
    async fn handle(
        &self,
        cx: &mut Context<'_>,
        event: OrderCancelled,
    ) -> Result<(), HandlerError> {
        release(cx, event.order_id, event.user_id).await
    }
}

impl Handler<PaymentFailed> for HandlerState {
    async fn handle(&self, cx: &mut Context<'_>, event: PaymentFailed) -> Result<(), HandlerError> {
        release(cx, event.order_id, event.user_id).await
    }
}
