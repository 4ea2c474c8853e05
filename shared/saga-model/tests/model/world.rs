//! The three services' tables in memory, the network between them, and the
//! services' own decision functions applied to what is delivered.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::script::*;
use chrono::{DateTime, Duration, TimeZone as _, Utc};
use shop_domain::{OrderId, UserId};
use shop_inventory::domain::{
    self as inventory, Line, Placed, Release, Reservation, Status as Held, Stock,
};
use shop_order::domain::{self as order, Decision, OrderLines, SagaEvent, Status};
use shop_payment::domain::{
    self as payment, Charge, Charged, Debit, PaymentStatus, ProviderCancel, Refund, Settle,
};
use uuid::Uuid;

/// What the order service keeps of an order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct OrderRow {
    pub(crate) user: UserId,
    pub(crate) status: Status,
    pub(crate) total: i64,
}

/// The three services' tables, the network and a count of side effects.
/// Ordered maps only, so that two worlds with the same tables are equal
/// and hash alike (the exhaustive check visits each world once).
#[derive(Debug, Default, Clone, PartialEq, Eq, Hash)]
pub(crate) struct World {
    // The order service.
    pub(crate) known_users: BTreeSet<UserId>,
    pub(crate) orders: BTreeMap<OrderId, OrderRow>,
    pub(crate) late: bool,
    // The inventory service.
    pub(crate) stock: BTreeMap<String, Stock>,
    pub(crate) reserved: BTreeMap<String, i64>,
    pub(crate) sold: BTreeMap<String, i64>,
    pub(crate) reservations: BTreeMap<OrderId, (Held, Vec<Line>)>,
    // The payment service: the credit each wallet opens with, the wallets.
    pub(crate) credit: BTreeMap<UserId, i64>,
    pub(crate) balances: BTreeMap<UserId, i64>,
    pub(crate) payments: BTreeMap<OrderId, (PaymentStatus, i64, UserId)>,
    /// Payments go through the provider.
    pub(crate) provider: bool,
    /// PENDING charges whose order was cancelled meanwhile.
    pub(crate) cancel_requested: BTreeSet<OrderId>,
    // The provider: one charge per key (the order): succeeded, amount,
    // refunded, payer.
    pub(crate) ledger: BTreeMap<OrderId, (bool, i64, i64, UserId)>,
    // The network: events published and not yet consumed.
    pub(crate) pending: Vec<Delivery>,
    // How often each side effect and each event happened, per order (or
    // user), to find what happened twice.
    pub(crate) effects: BTreeMap<(&'static str, Uuid), u32>,
    pub(crate) published: BTreeMap<(&'static str, Uuid), u32>,
    /// A mistake seeded into the glue around the decision functions, to
    /// show that the checks find it; never set outside those tests.
    pub(crate) bug: Option<Bug>,
    /// The orders a seeded sweep read as overdue and has not cancelled yet.
    pub(crate) swept: BTreeSet<OrderId>,
}

/// Mistakes a service could make around its decision functions, seeded
/// one at a time to show that the exhaustive check finds each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Bug {
    /// The payment service settles a charge's outcome without asking
    /// whether the order was cancelled while the charge was on its way.
    SettleIgnoresCancellation,
    /// The inventory service releases what it holds but leaves no
    /// tombstone for an order it has not seen yet.
    ReleaseForgetsTombstone,
    /// The sweeper cancels every order it once found PENDING without
    /// reading its status again.
    SweepDoesNotRecheck,
}

pub(crate) fn deadline() -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000, 0).unwrap()
}

impl World {
    pub(crate) fn now(&self) -> DateTime<Utc> {
        deadline()
            + if self.late {
                Duration::seconds(1)
            } else {
                Duration::seconds(-1)
            }
    }

    pub(crate) fn publish(&mut self, event: Event) {
        if !event.at_provider() {
            *self.published.entry(event.key()).or_default() += 1;
        }
        for &to in event.consumers() {
            self.pending.push(Delivery {
                to,
                event: event.clone(),
                redelivered: false,
            });
        }
    }

    fn effect(&mut self, (what, id): (&'static str, Uuid)) {
        *self.effects.entry((what, id)).or_default() += 1;
    }

    /// PlaceOrder: only for a user the order service knows, with lines
    /// that pass validation.
    pub(crate) fn place(&mut self, order_id: OrderId, user: UserId, lines: &[(String, i32)]) {
        if self.orders.contains_key(&order_id) || !self.known_users.contains(&user) {
            return;
        }
        let Ok(lines) = OrderLines::parse(lines) else {
            return;
        };
        self.orders.insert(
            order_id,
            OrderRow {
                user,
                status: Status::Pending,
                total: 0,
            },
        );
        let items = lines
            .lines()
            .iter()
            .map(|(sku, quantity)| (sku.clone(), i64::from(*quantity)))
            .collect();
        self.publish(Event::OrderPlaced {
            order: order_id,
            user,
            items,
        });
    }

    /// The deadline sweep: the sweeper cancels what is PENDING past its
    /// deadline, deciding on each order's status as it writes (one guarded
    /// statement). With [`Bug::SweepDoesNotRecheck`] it only reads here
    /// which orders it will cancel; [`World::sweep_writes`] cancels them
    /// later, as a sweep that selects and then updates by id would.
    pub(crate) fn sweep(&mut self) {
        let now = self.now();
        let ids: Vec<OrderId> = self.orders.keys().copied().collect();
        for id in ids {
            let row = &self.orders[&id];
            if row.status != Status::Pending {
                continue;
            }
            if let Decision::Cancel(_) =
                order::decide(row.status, deadline(), now, &SagaEvent::DeadlinePassed)
            {
                if self.bug == Some(Bug::SweepDoesNotRecheck) {
                    self.swept.insert(id);
                } else {
                    let user = row.user;
                    self.cancel(id, user);
                }
            }
        }
    }

    /// The second half of the seeded sweep: cancels what it read, whatever
    /// happened to those orders since.
    pub(crate) fn sweep_writes(&mut self) {
        for id in std::mem::take(&mut self.swept) {
            let user = self.orders[&id].user;
            self.cancel(id, user);
        }
    }

    pub(crate) fn cancel(&mut self, id: OrderId, user: UserId) {
        if let Some(row) = self.orders.get_mut(&id) {
            row.status = Status::Cancelled;
        }
        self.publish(Event::OrderCancelled { order: id, user });
    }

    /// Runs one consumer's handler on a batch of events of one type, as the
    /// service's app layer does around its domain; `Err` when the step
    /// cannot be decided yet (the batch is tried again later) or is
    /// refused (a failure of the model).
    pub(crate) fn handle(
        &mut self,
        to: Consumer,
        events: &[Event],
    ) -> Result<(), shop_domain::StepError> {
        match (to, &events[0]) {
            (Consumer::Order, Event::UserCreated { .. }) => {
                for event in events {
                    if let Event::UserCreated { user } = event {
                        self.known_users.insert(*user);
                    }
                }
                Ok(())
            }
            (Consumer::Payment, Event::UserCreated { .. }) => {
                for event in events {
                    if let Event::UserCreated { user } = event {
                        // Opened with its credit, unless open already.
                        if !self.balances.contains_key(user) {
                            self.effect(("open wallet", user.get()));
                            self.balances.insert(*user, self.credit[user]);
                        }
                    }
                }
                Ok(())
            }
            (Consumer::Order, _) => {
                self.advance(events);
                Ok(())
            }
            (Consumer::Inventory, Event::OrderPlaced { .. }) => {
                self.reserve(events);
                Ok(())
            }
            (Consumer::Inventory, Event::OrderConfirmed { .. }) => self.sell(events),
            (Consumer::Inventory, _) => {
                for event in events {
                    let (Event::PaymentFailed { order, .. } | Event::OrderCancelled { order, .. }) =
                        event
                    else {
                        unreachable!("{event:?} to inventory");
                    };
                    self.release(*order)?;
                }
                Ok(())
            }
            (Consumer::Payment, Event::Reserved { .. }) if self.provider => {
                self.record_intents(events);
                Ok(())
            }
            (Consumer::Payment, Event::Reserved { .. }) => self.debit(events),
            (Consumer::Payment, Event::Charged { .. } | Event::RefundDone { .. }) => {
                for event in events {
                    match event {
                        Event::Charged {
                            order, succeeded, ..
                        } => self.settle(*order, *succeeded),
                        Event::RefundDone { order, .. } => self.settle_refund(*order),
                        other => unreachable!("{other:?}"),
                    }
                }
                Ok(())
            }
            (Consumer::Payment, _) => {
                for event in events {
                    let Event::OrderCancelled { order, user } = event else {
                        unreachable!("{event:?} to payment");
                    };
                    if self.provider {
                        self.cancel_at_provider(*order, *user);
                    } else {
                        self.refund(*order, *user)?;
                    }
                }
                Ok(())
            }
            (Consumer::Provider, _) => {
                for event in events {
                    match event {
                        Event::ChargeCall {
                            order,
                            user,
                            amount,
                        } => self.provider_charges(*order, *user, *amount),
                        Event::RefundCall { order } => self.provider_refunds(*order)?,
                        other => unreachable!("{other:?} to the provider"),
                    }
                }
                Ok(())
            }
        }
    }

    /// The order's confirmation or cancellation, as `order::app::advance` does: a total recorded
    /// while PENDING, then what `decide` says.
    pub(crate) fn advance(&mut self, events: &[Event]) {
        let now = self.now();
        for event in events {
            let (id, saga_event, total) = match event {
                Event::Reserved { order, total, .. } => (*order, SagaEvent::Reserved, Some(*total)),
                Event::Rejected { order, reason } => {
                    (*order, SagaEvent::Rejected(reason.clone()), None)
                }
                Event::PaymentCompleted { order, amount } => {
                    (*order, SagaEvent::PaymentCompleted, Some(*amount))
                }
                Event::PaymentFailed { order, reason, .. } => {
                    (*order, SagaEvent::PaymentFailed(reason.clone()), None)
                }
                other => unreachable!("{other:?} to order"),
            };
            let row = self
                .orders
                .get_mut(&id)
                .expect("an order exists before its events");
            if let Some(total) = total.filter(|_| row.status == Status::Pending) {
                row.total = total;
            }
            match order::decide(row.status, deadline(), now, &saga_event) {
                Decision::Record => {}
                Decision::Confirm => {
                    row.status = Status::Confirmed;
                    self.publish(Event::OrderConfirmed { order: id });
                }
                Decision::Cancel(_) => {
                    let user = row.user;
                    self.cancel(id, user);
                }
            }
        }
    }

    /// The reservation, as `inventory::app::reserve` does around `reserve_in_turn`.
    pub(crate) fn reserve(&mut self, events: &[Event]) {
        let placed: Vec<Placed> = events
            .iter()
            .map(|event| match event {
                Event::OrderPlaced { order, user, items } => Placed {
                    order_id: *order,
                    user_id: *user,
                    items: items.clone(),
                },
                other => unreachable!("{other:?}"),
            })
            .collect();
        let mut decided: HashSet<OrderId> = self.reservations.keys().copied().collect();
        let mut stock: HashMap<String, Stock> =
            std::mem::take(&mut self.stock).into_iter().collect();
        let decisions = inventory::reserve_in_turn(&placed, &mut decided, &mut stock);
        self.stock = stock.into_iter().collect();
        for (order, decision) in placed.iter().zip(decisions) {
            match decision {
                Reservation::Reserved { lines, total_cents } => {
                    self.effect(("reserve", order.order_id.get()));
                    for line in &lines {
                        *self.reserved.entry(line.sku.clone()).or_default() += line.quantity;
                    }
                    self.reservations
                        .insert(order.order_id, (Held::Reserved, lines));
                    self.publish(Event::Reserved {
                        order: order.order_id,
                        user: order.user_id,
                        total: total_cents,
                    });
                }
                Reservation::Rejected { reason, .. } => {
                    self.reservations
                        .insert(order.order_id, (Held::Rejected, Vec::new()));
                    self.publish(Event::Rejected {
                        order: order.order_id,
                        reason,
                    });
                }
                Reservation::AlreadyDecided => {}
            }
        }
    }

    /// The release of a reservation, as `inventory::app::release` does.
    pub(crate) fn release(&mut self, id: OrderId) -> Result<(), shop_domain::StepError> {
        let status = self.reservations.get(&id).map(|(status, _)| *status);
        match inventory::release(id, status)? {
            Release::Release => {
                self.effect(("release", id.get()));
                let (status, lines) = self.reservations.get_mut(&id).expect("held");
                *status = Held::Released;
                for line in lines.iter() {
                    *self.reserved.entry(line.sku.clone()).or_default() -= line.quantity;
                    if let Some(stock) = self.stock.get_mut(&line.sku) {
                        stock.available += line.quantity;
                    }
                }
                self.publish(Event::Released { order: id });
            }
            Release::Nothing => {}
            Release::Tombstone if self.bug == Some(Bug::ReleaseForgetsTombstone) => {}
            Release::Tombstone => {
                self.reservations.insert(id, (Held::Cancelled, Vec::new()));
            }
        }
        Ok(())
    }

    /// The sale, as `inventory::app::sell` does: every order of the batch
    /// decided first, then the sales (none if one cannot be decided).
    pub(crate) fn sell(&mut self, events: &[Event]) -> Result<(), shop_domain::StepError> {
        let mut to_sell = Vec::new();
        for event in events {
            let Event::OrderConfirmed { order } = event else {
                unreachable!("{event:?}");
            };
            let status = self.reservations.get(order).map(|(status, _)| *status);
            if inventory::sell(*order, status)? && !to_sell.contains(order) {
                to_sell.push(*order);
            }
        }
        for id in to_sell {
            self.effect(("sell", id.get()));
            let (status, lines) = self.reservations.get_mut(&id).expect("held");
            *status = Held::Sold;
            for line in lines.iter() {
                *self.reserved.entry(line.sku.clone()).or_default() -= line.quantity;
                *self.sold.entry(line.sku.clone()).or_default() += line.quantity;
            }
        }
        Ok(())
    }

    /// The payment, as `payment::app::debit` does around `debit_in_turn`: the
    /// whole batch or, when one wallet is not open yet, nothing.
    pub(crate) fn debit(&mut self, events: &[Event]) -> Result<(), shop_domain::StepError> {
        let charges: Vec<Charge> = events
            .iter()
            .map(|event| match event {
                Event::Reserved { order, user, total } => Charge {
                    order_id: *order,
                    user_id: *user,
                    amount_cents: *total,
                },
                other => unreachable!("{other:?}"),
            })
            .collect();
        let mut decided: HashSet<OrderId> = self.payments.keys().copied().collect();
        let mut balances: HashMap<UserId, i64> = self.balances.clone().into_iter().collect();
        let debits = payment::debit_in_turn(&charges, &mut decided, &mut balances)?;
        self.balances = balances.into_iter().collect();
        for (charge, debit) in charges.iter().zip(debits) {
            let Some(status) = debit.status() else {
                continue;
            };
            self.payments.insert(
                charge.order_id,
                (status, charge.amount_cents, charge.user_id),
            );
            match debit {
                Debit::Captured => {
                    self.effect(("capture", charge.order_id.get()));
                    self.publish(Event::PaymentCompleted {
                        order: charge.order_id,
                        amount: charge.amount_cents,
                    });
                }
                Debit::Declined(reason) => self.publish(Event::PaymentFailed {
                    order: charge.order_id,
                    user: charge.user_id,
                    reason,
                }),
                Debit::AlreadyDecided => {}
            }
        }
        Ok(())
    }

    /// The refund, as `payment::app::refund` does.
    pub(crate) fn refund(
        &mut self,
        id: OrderId,
        user: UserId,
    ) -> Result<(), shop_domain::StepError> {
        let payment = self.payments.get(&id).copied();
        match payment::refund(payment.map(|(status, _, _)| status)) {
            Refund::Refund => {
                let (_, amount, payer) = payment.expect("captured");
                let balance = self.balances[&payer];
                let refunded = payment::refunded(payer, balance, amount)?;
                self.effect(("refund", id.get()));
                self.balances.insert(payer, refunded);
                self.payments
                    .insert(id, (PaymentStatus::Refunded, amount, payer));
                self.publish(Event::Refunded { order: id });
            }
            Refund::Nothing => {}
            Refund::Tombstone => {
                self.payments
                    .insert(id, (PaymentStatus::Cancelled, 0, user));
            }
        }
        Ok(())
    }

    /// The payment through a provider, as `payment::app::record_intent` does:
    /// PENDING unless the order has a row, then the worker's call.
    pub(crate) fn record_intents(&mut self, events: &[Event]) {
        for event in events {
            let Event::Reserved { order, user, total } = event else {
                unreachable!("{event:?}");
            };
            if self.payments.contains_key(order) {
                continue;
            }
            self.payments
                .insert(*order, (PaymentStatus::Pending, *total, *user));
            self.publish(Event::ChargeCall {
                order: *order,
                user: *user,
                amount: *total,
            });
        }
    }

    /// The provider's charge under the order's key: made once, from the
    /// payer's funds (their credit, less what the provider keeps of
    /// theirs); the same key answers the same again, without a webhook.
    pub(crate) fn provider_charges(&mut self, order: OrderId, user: UserId, amount: i64) {
        if let Some(&(succeeded, ..)) = self.ledger.get(&order) {
            self.publish(Event::Charged {
                order,
                succeeded,
                via: Via::Answer,
            });
            return;
        }
        let kept: i64 = self
            .ledger
            .values()
            .filter(|(succeeded, _, _, payer)| *succeeded && *payer == user)
            .map(|(_, amount, refunded, _)| amount - refunded)
            .sum();
        let succeeded = self.credit[&user] - kept >= amount;
        if succeeded {
            self.effect(("provider charge", order.get()));
        }
        self.ledger.insert(order, (succeeded, amount, 0, user));
        for via in [Via::Answer, Via::Webhook] {
            self.publish(Event::Charged {
                order,
                succeeded,
                via,
            });
        }
    }

    /// The provider's refund under the order's refund key: once.
    pub(crate) fn provider_refunds(
        &mut self,
        order: OrderId,
    ) -> Result<(), shop_domain::StepError> {
        let Some((true, amount, refunded, _)) = self.ledger.get_mut(&order) else {
            return Err(shop_domain::StepError::Refused(format!(
                "a refund asked for {order}, which the provider never charged"
            )));
        };
        if *refunded == 0 {
            *refunded = *amount;
            self.effect(("provider refund", order.get()));
            for via in [Via::Answer, Via::Webhook] {
                self.publish(Event::RefundDone { order, via });
            }
        } else {
            self.publish(Event::RefundDone {
                order,
                via: Via::Answer,
            });
        }
        Ok(())
    }

    /// A charge's outcome, by answer or webhook, as
    /// `provider::steps::Steps::settle` does with `payment::settle`.
    pub(crate) fn settle(&mut self, order: OrderId, succeeded: bool) {
        let Some(&(status, amount, user)) = self.payments.get(&order) else {
            return;
        };
        let charged = if succeeded {
            Charged::Succeeded
        } else {
            Charged::Declined("insufficient funds at the payment provider".into())
        };
        let cancelled = self.cancel_requested.contains(&order)
            && self.bug != Some(Bug::SettleIgnoresCancellation);
        match payment::settle(status, cancelled, charged) {
            Settle::Capture => {
                self.effect(("capture", order.get()));
                self.payments
                    .insert(order, (PaymentStatus::Captured, amount, user));
                self.publish(Event::PaymentCompleted { order, amount });
            }
            Settle::CaptureToRefund => {
                self.payments
                    .insert(order, (PaymentStatus::Refunding, amount, user));
                self.publish(Event::RefundCall { order });
            }
            Settle::Decline(reason) => {
                self.payments
                    .insert(order, (PaymentStatus::Declined, amount, user));
                self.publish(Event::PaymentFailed {
                    order,
                    user,
                    reason,
                });
            }
            Settle::Nothing => {}
        }
    }

    /// A refund's outcome: REFUNDING becomes REFUNDED, `payment.refunded`.
    pub(crate) fn settle_refund(&mut self, order: OrderId) {
        if let Some(&(PaymentStatus::Refunding, amount, user)) = self.payments.get(&order) {
            self.effect(("refund", order.get()));
            self.payments
                .insert(order, (PaymentStatus::Refunded, amount, user));
            self.publish(Event::Refunded { order });
        }
    }

    /// The refund through a provider, as
    /// `payment::app::cancel_at_provider` does.
    pub(crate) fn cancel_at_provider(&mut self, order: OrderId, user: UserId) {
        let payment = self.payments.get(&order).copied();
        match payment::cancel_at_provider(payment.map(|(status, _, _)| status)) {
            ProviderCancel::Tombstone => {
                self.payments
                    .insert(order, (PaymentStatus::Cancelled, 0, user));
            }
            ProviderCancel::RefundIfCaptured => {
                self.cancel_requested.insert(order);
            }
            ProviderCancel::Refund => {
                let (_, amount, payer) = payment.expect("captured");
                self.payments
                    .insert(order, (PaymentStatus::Refunding, amount, payer));
                self.publish(Event::RefundCall { order });
            }
            ProviderCancel::Nothing => {}
        }
    }

    /// The worker calls again for every payment whose outcome it does not
    /// know: `true` if there was one.
    pub(crate) fn retry(&mut self) -> bool {
        let calls: Vec<Event> = self
            .payments
            .iter()
            .filter_map(|(order, (status, amount, user))| match status {
                PaymentStatus::Pending => Some(Event::ChargeCall {
                    order: *order,
                    user: *user,
                    amount: *amount,
                }),
                PaymentStatus::Refunding => Some(Event::RefundCall { order: *order }),
                _ => None,
            })
            .collect();
        let any = !calls.is_empty();
        for call in calls {
            self.publish(call);
        }
        any
    }

    /// Loses the `pick`th pending call, answer or webhook of the provider's.
    pub(crate) fn lose(&mut self, pick: usize) {
        let at_provider: Vec<usize> = (0..self.pending.len())
            .filter(|&i| self.pending[i].event.at_provider())
            .collect();
        if !at_provider.is_empty() {
            self.pending.remove(at_provider[pick % at_provider.len()]);
        }
    }

    /// Delivers the pending events at `indices` (one consumer, one type) as
    /// one batch; they stay pending when the step cannot be decided yet, and
    /// when `keep` (a redelivery to come, marked as one).
    pub(crate) fn deliver(&mut self, mut indices: Vec<usize>, keep: bool) -> Result<(), String> {
        indices.sort_unstable();
        indices.dedup();
        let to = self.pending[indices[0]].to;
        let events: Vec<Event> = indices
            .iter()
            .map(|&i| self.pending[i].event.clone())
            .collect();
        match self.handle(to, &events) {
            Ok(()) if keep => {
                for &i in &indices {
                    self.pending[i].redelivered = true;
                }
                Ok(())
            }
            Ok(()) => {
                for &i in indices.iter().rev() {
                    self.pending.remove(i);
                }
                Ok(())
            }
            Err(shop_domain::StepError::NotYet(_)) => Ok(()),
            Err(shop_domain::StepError::Refused(reason)) => {
                Err(format!("{to:?} refused {events:?}: {reason}"))
            }
        }
    }

    /// The pending events that `pick` and `size` choose: one, and up to
    /// `size - 1` more for the same consumer of the same type.
    pub(crate) fn batch(&self, pick: usize, size: usize) -> Vec<usize> {
        let first = pick % self.pending.len();
        let kind = |d: &Delivery| (d.to, d.event.key().0);
        let wanted = kind(&self.pending[first]);
        let mut indices = vec![first];
        indices.extend(
            (0..self.pending.len())
                .filter(|&i| i != first && kind(&self.pending[i]) == wanted)
                .take(size - 1),
        );
        indices
    }
}
