//! The event adapter: a routing table from event to saga step.
//!
//! | consumes | does | emits |
//! |---|---|---|
//! | `order.placed` | reserve all lines or none | `inventory.reserved` or `inventory.rejected` |
//! | `order.confirmed` | reserved -> sold | - |
//! | `payment.failed`, `order.cancelled` | release the reservation, or leave a tombstone | `inventory.released` |

use diesel::QueryResult;
use diesel_async::AsyncPgConnection;
use shop_messaging::consumer::uuid_field as id;
use shop_messaging::{
    Batch, BatchHandler, Context, Handler, HandlerError, LockNames, Route, Router,
};
use shop_proto::Event;
use shop_proto::inventory::v1::{
    InventoryRejected, InventoryReleased, InventoryReserved, ReservedLine,
};
use shop_proto::order::v1::{OrderCancelled, OrderConfirmed, OrderPlaced};
use shop_proto::payment::v1::PaymentFailed;

use crate::domain::{Line, Placed, Reservation};
use crate::{app, store};

/// What the handlers share; the database comes with each event's transaction.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HandlerState;

/// The routes for events on the `ORDER` stream.
///
/// Every step changes the counts of the products it touches; each names
/// those products, so that batches lock them in one order (see
/// [`Route::locking`]).
pub(crate) fn order_events() -> Router<HandlerState> {
    Router::new()
        .on::<OrderPlaced>(Route::batched().locking())
        .on::<OrderConfirmed>(Route::batched().locking())
        .on::<OrderCancelled>(Route::single().locking())
}

/// The routes for events on the `PAYMENT` stream.
pub(crate) fn payment_events() -> Router<HandlerState> {
    Router::new().on::<PaymentFailed>(Route::single().locking())
}

fn product_lock(sku: &str) -> String {
    format!("product:{sku}")
}

/// The products an order asks for.
impl LockNames<OrderPlaced> for HandlerState {
    async fn lock_names(
        &self,
        _: &mut AsyncPgConnection,
        events: Vec<&OrderPlaced>,
    ) -> QueryResult<Vec<String>> {
        Ok(events
            .iter()
            .flat_map(|event| &event.items)
            .map(|item| product_lock(&item.sku))
            .collect())
    }
}

/// The events that end a reservation, named by its order.
trait EndsReservation {
    fn order_id(&self) -> &str;
}

impl EndsReservation for OrderConfirmed {
    fn order_id(&self) -> &str {
        &self.order_id
    }
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
/// malformed id: its handler reports that).
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

/// Reserves all of each order's lines, or none.
impl BatchHandler<OrderPlaced> for HandlerState {
    async fn handle_batch(
        &self,
        batch: &mut Batch<'_>,
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
        let decisions = app::reserve(batch.conn(), &orders).await?;
        for (index, (event, decision)) in events.into_iter().zip(decisions).enumerate() {
            match decision {
                Reservation::Reserved { lines, total_cents } => batch.emit(
                    index,
                    &InventoryReserved {
                        order_id: event.order_id,
                        user_id: event.user_id,
                        total_cents,
                        lines: to_proto(&lines),
                    },
                ),
                Reservation::Rejected { sku, reason } => batch.emit(
                    index,
                    &InventoryRejected {
                        order_id: event.order_id,
                        user_id: event.user_id,
                        reason,
                        sku,
                    },
                ),
                Reservation::AlreadyDecided => {}
            }
        }
        Ok(())
    }
}

/// Reserved -> sold.
impl BatchHandler<OrderConfirmed> for HandlerState {
    async fn handle_batch(
        &self,
        batch: &mut Batch<'_>,
        events: Vec<OrderConfirmed>,
    ) -> Result<(), HandlerError> {
        let order_ids = events
            .iter()
            .map(|event| id("order_id", &event.order_id))
            .collect::<Result<Vec<_>, _>>()?;
        app::sell(batch.conn(), &order_ids).await
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
