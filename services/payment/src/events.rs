//! The event adapter: a routing table from event to saga step.
//!
//! | consumes | does | emits |
//! |---|---|---|
//! | `user.created` | open the wallet with the starting credit | - |
//! | `inventory.reserved` | debit the wallet | `payment.completed` or `payment.failed` |
//! | `order.cancelled` | refund a capture, or leave a tombstone | `payment.refunded` |

use diesel::QueryResult;
use diesel_async::AsyncPgConnection;
use shop_messaging::consumer::uuid_field as id;
use shop_messaging::{Batch, BoxFuture, Context, HandlerError, Router};
use shop_proto::inventory::v1::InventoryReserved;
use shop_proto::order::v1::OrderCancelled;
use shop_proto::payment::v1::{PaymentCompleted, PaymentFailed, PaymentRefunded};
use shop_proto::user::v1::UserCreated;

use crate::app;
use crate::domain::{Charge, Debit};

/// What the handlers share.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HandlerState {
    /// The credit a new wallet opens with, in cents.
    pub(crate) starting_credit: i64,
}

pub(crate) fn user_events() -> Router<HandlerState> {
    Router::new().on::<UserCreated, _>(on_user_created)
}

/// Debits and refunds each change one wallet, and name it, so that batches
/// lock wallets in one order (see [`Router::on_locking`]).
pub(crate) fn inventory_events() -> Router<HandlerState> {
    Router::new().on_batch_locking::<InventoryReserved, _, _>(wallets, on_inventories_reserved)
}

pub(crate) fn order_events() -> Router<HandlerState> {
    Router::new().on_locking::<OrderCancelled, _, _>(wallets, on_order_cancelled)
}

/// The lock names of the events' wallets.
fn wallets<'a, E: HasUser>(
    _: &'a mut AsyncPgConnection,
    events: Vec<&'a E>,
) -> BoxFuture<'a, QueryResult<Vec<String>>> {
    let names = events
        .iter()
        .map(|event| format!("wallet:{}", event.user_id()))
        .collect();
    Box::pin(std::future::ready(Ok(names)))
}

/// The events that name the wallet they change.
trait HasUser {
    fn user_id(&self) -> &str;
}

impl HasUser for InventoryReserved {
    fn user_id(&self) -> &str {
        &self.user_id
    }
}

impl HasUser for OrderCancelled {
    fn user_id(&self) -> &str {
        &self.user_id
    }
}

fn on_user_created<'a>(
    h: &'a HandlerState,
    cx: &'a mut Context<'_>,
    event: UserCreated,
) -> BoxFuture<'a, Result<(), HandlerError>> {
    Box::pin(async move {
        app::open_wallet(cx.conn(), id("user_id", &event.user_id)?, h.starting_credit).await
    })
}

fn on_inventories_reserved<'a>(
    _: &'a HandlerState,
    batch: &'a mut Batch<'_>,
    events: Vec<InventoryReserved>,
) -> BoxFuture<'a, Result<(), HandlerError>> {
    Box::pin(async move {
        let charges = events
            .iter()
            .map(|event| {
                Ok(Charge {
                    order_id: id("order_id", &event.order_id)?.into(),
                    user_id: id("user_id", &event.user_id)?.into(),
                    amount_cents: event.total_cents,
                })
            })
            .collect::<Result<Vec<_>, HandlerError>>()?;
        let decisions = app::debit(batch.conn(), &charges).await?;
        for (index, (event, decision)) in events.into_iter().zip(decisions).enumerate() {
            match decision {
                Debit::Captured => batch.emit(
                    index,
                    &PaymentCompleted {
                        order_id: event.order_id,
                        user_id: event.user_id,
                        amount_cents: event.total_cents,
                    },
                ),
                Debit::Declined(reason) => batch.emit(
                    index,
                    &PaymentFailed {
                        order_id: event.order_id,
                        user_id: event.user_id,
                        amount_cents: event.total_cents,
                        reason,
                    },
                ),
                Debit::AlreadyDecided => {}
            }
        }
        Ok(())
    })
}

fn on_order_cancelled<'a>(
    _: &'a HandlerState,
    cx: &'a mut Context<'_>,
    event: OrderCancelled,
) -> BoxFuture<'a, Result<(), HandlerError>> {
    Box::pin(async move {
        let refunded = app::refund(
            cx.conn(),
            id("order_id", &event.order_id)?,
            id("user_id", &event.user_id)?,
        )
        .await?;
        if let Some(amount_cents) = refunded {
            cx.emit(&PaymentRefunded {
                order_id: event.order_id,
                user_id: event.user_id,
                amount_cents,
            });
        }
        Ok(())
    })
}
