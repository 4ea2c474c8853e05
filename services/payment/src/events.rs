//! The event adapter: a routing table from event to saga step.
//!
//! | consumes | does | emits |
//! |---|---|---|
//! | `user.created` | open the wallet with the starting credit | - |
//! | `inventory.reserved` | debit the wallet | `payment.completed` or `payment.failed` |
//! | `order.cancelled` | refund a capture, or leave a tombstone | `payment.refunded` |
//!
//! With a payment provider, `inventory.reserved` records the intent and
//! `order.cancelled` makes a capture due for its refund; the provider's
//! worker emits the events once the provider has answered
//! ([`crate::provider`]).

use diesel::QueryResult;
use diesel_async::AsyncPgConnection;
use pg_jetstream::consumer::uuid_field as id;
use pg_jetstream::{
    Context, Handler, HandlerError, Route, Router,
    consumer::{LockNames, Statement, StatementHandler},
};
use shop_proto::Event;
use shop_proto::inventory::v1::InventoryReserved;
use shop_proto::order::v1::OrderCancelled;
use shop_proto::payment::v1::{PaymentCompleted, PaymentFailed, PaymentRefunded};
use shop_proto::user::v1::UserCreated;

use std::sync::Arc;

use crate::app;
use crate::domain::{Charge, Debit};
use crate::provider::http::HttpProvider;
use crate::provider::steps::Steps;

/// What the handlers share.
#[derive(Debug, Clone)]
pub(crate) struct HandlerState {
    /// The credit a new wallet opens with, in cents.
    pub(crate) starting_credit: i64,
    /// The provider's steps, when payments go through one.
    pub(crate) provider: Option<Arc<Steps<HttpProvider>>>,
}

pub(crate) fn user_events() -> Router<HandlerState> {
    Router::new().on::<UserCreated>(Route::single())
}

/// Debits read the wallets and write them once, if unchanged; with a
/// provider, each reservation records its intent.
pub(crate) fn inventory_events(by_provider: bool) -> Router<HandlerState> {
    if by_provider {
        Router::new().on::<InventoryReserved>(Route::single())
    } else {
        Router::new().on::<InventoryReserved>(Route::in_one_statement())
    }
}

/// A refund changes one wallet and names it, so that refunds lock wallets
/// in one order (see [`Route::locking`]).
pub(crate) fn order_events() -> Router<HandlerState> {
    Router::new().on::<OrderCancelled>(Route::single().locking())
}

/// The events that name the wallet they change.
trait HasUser {
    fn user_id(&self) -> &str;
}

impl HasUser for OrderCancelled {
    fn user_id(&self) -> &str {
        &self.user_id
    }
}

/// The lock names of the events' wallets.
impl<E: Event + HasUser> LockNames<E> for HandlerState {
    async fn lock_names(
        &self,
        _: &mut AsyncPgConnection,
        events: Vec<&E>,
    ) -> QueryResult<Vec<String>> {
        Ok(events
            .iter()
            .map(|event| format!("wallet:{}", event.user_id()))
            .collect())
    }
}

/// Opens the wallet with the starting credit.
impl Handler<UserCreated> for HandlerState {
    async fn handle(&self, cx: &mut Context<'_>, event: UserCreated) -> Result<(), HandlerError> {
        app::open_wallet(
            cx.conn(),
            id("user_id", &event.user_id)?,
            self.starting_credit,
        )
        .await
    }
}

/// Debits each reserved order's wallet, or declines, in one statement.
impl StatementHandler<InventoryReserved> for HandlerState {
    async fn handle_in_statement(
        &self,
        step: &mut Statement<'_>,
        events: Vec<InventoryReserved>,
    ) -> Result<(), HandlerError> {
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
        let debits = app::debit(step.conn(), &charges).await?;
        if !debits.change() {
            return Ok(());
        }
        for (index, (event, decision)) in events.into_iter().zip(&debits.decisions).enumerate() {
            match decision {
                Debit::Captured => step.emit(
                    index,
                    &PaymentCompleted {
                        order_id: event.order_id,
                        user_id: event.user_id,
                        amount_cents: event.total_cents,
                        provider: None,
                    },
                ),
                Debit::Declined(reason) => step.emit(
                    index,
                    &PaymentFailed {
                        order_id: event.order_id,
                        user_id: event.user_id,
                        amount_cents: event.total_cents,
                        reason: reason.clone(),
                        provider: None,
                    },
                ),
                Debit::AlreadyDecided => {}
            }
        }
        let carried = step.carry();
        app::write_debits(step.conn(), &debits, &carried).await
    }
}

/// With a provider: records the intent to charge, and wakes the worker
/// once it is committed.
impl Handler<InventoryReserved> for HandlerState {
    async fn handle(
        &self,
        cx: &mut Context<'_>,
        event: InventoryReserved,
    ) -> Result<(), HandlerError> {
        let steps = self.provider.clone().ok_or_else(|| {
            HandlerError::permanent("inventory.reserved routed to a provider, and there is none")
        })?;
        let charge = Charge {
            order_id: id("order_id", &event.order_id)?.into(),
            user_id: id("user_id", &event.user_id)?.into(),
            amount_cents: event.total_cents,
        };
        app::record_intent(cx.conn(), &charge).await?;
        cx.after_commit(move || steps.wake());
        Ok(())
    }
}

/// Refunds a capture, or leaves a tombstone; with a provider, makes the
/// refund due (the worker emits `payment.refunded` once it is made).
impl Handler<OrderCancelled> for HandlerState {
    async fn handle(
        &self,
        cx: &mut Context<'_>,
        event: OrderCancelled,
    ) -> Result<(), HandlerError> {
        if let Some(steps) = self.provider.clone() {
            let due = app::cancel_at_provider(
                cx.conn(),
                id("order_id", &event.order_id)?,
                id("user_id", &event.user_id)?,
            )
            .await?;
            if due {
                cx.after_commit(move || steps.wake());
            }
            return Ok(());
        }
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
                provider: None,
            });
        }
        Ok(())
    }
}
