//! The saga as a model: the four services' own decision functions (their
//! `domain` modules), driven through the interleavings the network allows,
//! with the state each service keeps in its tables held in memory.
//!
//! A scenario is a few users with starting credit, two products and a few
//! orders (unknown SKUs and quantities past the stock included), and a
//! script of moves: deliver any pending event to its consumer, deliver it
//! and keep it for a redelivery (a consumer whose ack was lost: the
//! handler runs again, with no inbox to absorb it, so the decisions
//! themselves must), deliver several of one kind to one consumer as one
//! batch, place an order, or let the deadline pass (the sweeper runs; later
//! captures cancel). Events go out in any order; a step that cannot be
//! decided yet waits for a later try. When the script ends every pending
//! event is delivered; then every invariant of the design is checked:
//!
//! - every placed order is CONFIRMED or CANCELLED;
//! - per SKU, available + reserved + sold is what was stocked, none below
//!   zero;
//! - per user, balance + captured - refunded is the starting credit, no
//!   cancelled order keeps a capture, every confirmed order has exactly one
//!   capture of its total and a sold reservation;
//! - no side effect (reserve, release, sale, capture, refund) and no event
//!   happens twice for one order;
//! - no step is refused (a refusal would dead-letter a saga event).
//!
//! `MODEL_CASES` (default 3000) and `MODEL_SEED` (default 1) set the run;
//! a failure is shrunk to its smallest script and printed with its seed.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Duration, TimeZone as _, Utc};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use shop_domain::{OrderId, UserId};
use shop_inventory::domain::{
    self as inventory, Line, Placed, Release, Reservation, Status as Held, Stock,
};
use shop_order::domain::{self as order, Decision, OrderLines, SagaEvent, Status};
use shop_payment::domain::{self as payment, Charge, Debit, PaymentStatus, Refund};
use uuid::Uuid;

/// The consumers, one durable consumer each in the real system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Consumer {
    Order,
    Inventory,
    Payment,
}

/// The saga's events, with what their consumers read of them.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    UserCreated {
        user: UserId,
    },
    OrderPlaced {
        order: OrderId,
        user: UserId,
        items: Vec<(String, i64)>,
    },
    Reserved {
        order: OrderId,
        user: UserId,
        total: i64,
    },
    Rejected {
        order: OrderId,
        reason: String,
    },
    PaymentCompleted {
        order: OrderId,
        amount: i64,
    },
    PaymentFailed {
        order: OrderId,
        user: UserId,
        reason: String,
    },
    OrderConfirmed {
        order: OrderId,
    },
    OrderCancelled {
        order: OrderId,
        user: UserId,
    },
    Released {
        order: OrderId,
    },
    Refunded {
        order: OrderId,
    },
}

impl Event {
    /// The event's type and the order it is about: what may happen once.
    fn key(&self) -> (&'static str, Uuid) {
        match self {
            Self::UserCreated { user } => ("user.created", user.get()),
            Self::OrderPlaced { order, .. } => ("order.placed", order.get()),
            Self::Reserved { order, .. } => ("inventory.reserved", order.get()),
            Self::Rejected { order, .. } => ("inventory.rejected", order.get()),
            Self::PaymentCompleted { order, .. } => ("payment.completed", order.get()),
            Self::PaymentFailed { order, .. } => ("payment.failed", order.get()),
            Self::OrderConfirmed { order } => ("order.confirmed", order.get()),
            Self::OrderCancelled { order, .. } => ("order.cancelled", order.get()),
            Self::Released { order } => ("inventory.released", order.get()),
            Self::Refunded { order } => ("payment.refunded", order.get()),
        }
    }

    /// Who consumes it, as in DESIGN.md's saga table.
    fn consumers(&self) -> &'static [Consumer] {
        use Consumer::*;
        match self {
            Self::UserCreated { .. } => &[Order, Payment],
            Self::OrderPlaced { .. } | Self::OrderConfirmed { .. } => &[Inventory],
            Self::Reserved { .. } => &[Order, Payment],
            Self::Rejected { .. } | Self::PaymentCompleted { .. } => &[Order],
            Self::PaymentFailed { .. } => &[Order, Inventory],
            Self::OrderCancelled { .. } => &[Inventory, Payment],
            Self::Released { .. } | Self::Refunded { .. } => &[],
        }
    }
}

/// One event on its way to one consumer.
#[derive(Debug, Clone)]
struct Delivery {
    to: Consumer,
    event: Event,
}

/// A move of the script; the numbers pick among what is pending.
#[derive(Debug, Clone)]
enum Move {
    Deliver(usize),
    Redeliver(usize),
    Batch(usize, usize),
    Place(usize),
    DeadlinePasses,
    /// The first `count` pending events of this type to this consumer, as
    /// one batch, kept for a redelivery when `keep` (the regression cases
    /// below name their interleavings this way).
    Next {
        to: Consumer,
        kind: &'static str,
        count: usize,
        keep: bool,
    },
}

#[derive(Debug, Clone)]
struct Scenario {
    credits: Vec<i64>,
    /// Price and stock of SKUs "A" and "B".
    products: [(i64, i64); 2],
    /// Buyer (an index into the users) and lines of each order.
    orders: Vec<(usize, Vec<(String, i32)>)>,
    moves: Vec<Move>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let line = (
        prop_oneof![4 => Just("A"), 4 => Just("B"), 1 => Just("NOPE")],
        1i32..4,
    )
        .prop_map(|(sku, quantity)| (sku.to_owned(), quantity));
    let lines = prop::collection::vec(line, 1..3).prop_map(|mut lines| {
        // An order names each SKU once (OrderLines refuses it otherwise).
        let mut seen = HashSet::new();
        lines.retain(|(sku, _)| seen.insert(sku.clone()));
        lines
    });
    let moves = prop::collection::vec(
        prop_oneof![
            6 => any::<usize>().prop_map(Move::Deliver),
            2 => any::<usize>().prop_map(Move::Redeliver),
            2 => (any::<usize>(), 2usize..4).prop_map(|(pick, size)| Move::Batch(pick, size)),
            2 => any::<usize>().prop_map(Move::Place),
            1 => Just(Move::DeadlinePasses),
        ],
        0..60,
    );
    (
        prop::collection::vec(0i64..3000, 1..4),
        [(1i64..1500, 0i64..6), (1i64..1500, 0i64..6)],
        prop::collection::vec((any::<usize>(), lines), 1..5),
        moves,
    )
        .prop_map(|(credits, products, orders, moves)| Scenario {
            orders: orders
                .into_iter()
                .map(|(user, lines)| (user % credits.len(), lines))
                .collect(),
            credits,
            products,
            moves,
        })
}

/// What the order service keeps of an order.
#[derive(Debug)]
struct OrderRow {
    user: UserId,
    status: Status,
    total: i64,
}

/// The three services' tables, the network and a log of side effects.
#[derive(Debug, Default)]
struct World {
    // The order service.
    known_users: HashSet<UserId>,
    orders: BTreeMap<OrderId, OrderRow>,
    late: bool,
    // The inventory service.
    stock: HashMap<String, Stock>,
    reserved: HashMap<String, i64>,
    sold: HashMap<String, i64>,
    reservations: HashMap<OrderId, (Held, Vec<Line>)>,
    // The payment service: the credit each wallet opens with, the wallets.
    credit: HashMap<UserId, i64>,
    balances: HashMap<UserId, i64>,
    payments: HashMap<OrderId, (PaymentStatus, i64, UserId)>,
    // The network: events published and not yet consumed.
    pending: Vec<Delivery>,
    // Everything that happened, to find what happened twice.
    effects: Vec<(&'static str, Uuid)>,
    published: Vec<(&'static str, Uuid)>,
}

fn deadline() -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000, 0).unwrap()
}

impl World {
    fn now(&self) -> DateTime<Utc> {
        deadline()
            + if self.late {
                Duration::seconds(1)
            } else {
                Duration::seconds(-1)
            }
    }

    fn publish(&mut self, event: Event) {
        self.published.push(event.key());
        for &to in event.consumers() {
            self.pending.push(Delivery {
                to,
                event: event.clone(),
            });
        }
    }

    /// PlaceOrder: only for a user the order service knows, with lines
    /// that pass validation.
    fn place(&mut self, order_id: OrderId, user: UserId, lines: &[(String, i32)]) {
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

    /// Step t: the sweeper cancels what is PENDING past its deadline.
    fn sweep(&mut self) {
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
                let user = row.user;
                self.cancel(id, user);
            }
        }
    }

    fn cancel(&mut self, id: OrderId, user: UserId) {
        if let Some(row) = self.orders.get_mut(&id) {
            row.status = Status::Cancelled;
        }
        self.publish(Event::OrderCancelled { order: id, user });
    }

    /// Runs one consumer's handler on a batch of events of one type, as the
    /// service's app layer does around its domain; `Err` when the step
    /// cannot be decided yet (the batch is tried again later) or is
    /// refused (a failure of the model).
    fn handle(&mut self, to: Consumer, events: &[Event]) -> Result<(), shop_domain::StepError> {
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
                            self.effects.push(("open wallet", user.get()));
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
            (Consumer::Payment, Event::Reserved { .. }) => self.debit(events),
            (Consumer::Payment, _) => {
                for event in events {
                    let Event::OrderCancelled { order, user } = event else {
                        unreachable!("{event:?} to payment");
                    };
                    self.refund(*order, *user)?;
                }
                Ok(())
            }
        }
    }

    /// Steps 4 and c1, as `order::app::advance` does: a total recorded
    /// while PENDING, then what `decide` says.
    fn advance(&mut self, events: &[Event]) {
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

    /// Step 2, as `inventory::app::reserve` does around `reserve_in_turn`.
    fn reserve(&mut self, events: &[Event]) {
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
        let decisions = inventory::reserve_in_turn(&placed, &mut decided, &mut self.stock);
        for (order, decision) in placed.iter().zip(decisions) {
            match decision {
                Reservation::Reserved { lines, total_cents } => {
                    self.effects.push(("reserve", order.order_id.get()));
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

    /// Compensation c2, as `inventory::app::release` does.
    fn release(&mut self, id: OrderId) -> Result<(), shop_domain::StepError> {
        let status = self.reservations.get(&id).map(|(status, _)| *status);
        match inventory::release(id, status)? {
            Release::Release => {
                self.effects.push(("release", id.get()));
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
            Release::Tombstone => {
                self.reservations.insert(id, (Held::Cancelled, Vec::new()));
            }
        }
        Ok(())
    }

    /// Step 5, as `inventory::app::sell` does: every order of the batch
    /// decided first, then the sales (none if one cannot be decided).
    fn sell(&mut self, events: &[Event]) -> Result<(), shop_domain::StepError> {
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
            self.effects.push(("sell", id.get()));
            let (status, lines) = self.reservations.get_mut(&id).expect("held");
            *status = Held::Sold;
            for line in lines.iter() {
                *self.reserved.entry(line.sku.clone()).or_default() -= line.quantity;
                *self.sold.entry(line.sku.clone()).or_default() += line.quantity;
            }
        }
        Ok(())
    }

    /// Step 3, as `payment::app::debit` does around `debit_in_turn`: the
    /// whole batch or, when one wallet is not open yet, nothing.
    fn debit(&mut self, events: &[Event]) -> Result<(), shop_domain::StepError> {
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
        let mut balances = self.balances.clone();
        let debits = payment::debit_in_turn(&charges, &mut decided, &mut balances)?;
        self.balances = balances;
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
                    self.effects.push(("capture", charge.order_id.get()));
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

    /// Compensation c3, as `payment::app::refund` does.
    fn refund(&mut self, id: OrderId, user: UserId) -> Result<(), shop_domain::StepError> {
        let payment = self.payments.get(&id).copied();
        match payment::refund(payment.map(|(status, _, _)| status)) {
            Refund::Refund => {
                let (_, amount, payer) = payment.expect("captured");
                let balance = self.balances[&payer];
                let refunded = payment::refunded(payer, balance, amount)?;
                self.effects.push(("refund", id.get()));
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

    /// Delivers the pending events at `indices` (one consumer, one type) as
    /// one batch; they stay pending when the step cannot be decided yet, and
    /// when `keep` (a redelivery to come).
    fn deliver(&mut self, mut indices: Vec<usize>, keep: bool) -> Result<(), String> {
        indices.sort_unstable();
        indices.dedup();
        let to = self.pending[indices[0]].to;
        let events: Vec<Event> = indices
            .iter()
            .map(|&i| self.pending[i].event.clone())
            .collect();
        match self.handle(to, &events) {
            Ok(()) if !keep => {
                for &i in indices.iter().rev() {
                    self.pending.remove(i);
                }
                Ok(())
            }
            Ok(()) | Err(shop_domain::StepError::NotYet(_)) => Ok(()),
            Err(shop_domain::StepError::Refused(reason)) => {
                Err(format!("{to:?} refused {events:?}: {reason}"))
            }
        }
    }

    /// The pending events that `pick` and `size` choose: one, and up to
    /// `size - 1` more for the same consumer of the same type.
    fn batch(&self, pick: usize, size: usize) -> Vec<usize> {
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

/// Plays a scenario to its end and checks the invariants.
fn play(scenario: &Scenario) -> Result<(), String> {
    let users: Vec<UserId> = (0..scenario.credits.len())
        .map(|i| Uuid::from_u128(0x1000 + i as u128).into())
        .collect();
    let order_ids: Vec<OrderId> = (0..scenario.orders.len())
        .map(|i| Uuid::from_u128(0x2000 + i as u128).into())
        .collect();
    let mut world = World::default();
    let mut stocked = HashMap::new();
    for (sku, &(price_cents, stock)) in ["A", "B"].iter().zip(&scenario.products) {
        world.stock.insert(
            sku.to_string(),
            Stock {
                price_cents,
                available: stock,
            },
        );
        stocked.insert(sku.to_string(), stock);
    }
    for (user, &cents) in users.iter().zip(&scenario.credits) {
        world.credit.insert(*user, cents);
        world.publish(Event::UserCreated { user: *user });
    }
    let place = |world: &mut World, index: usize| {
        let (buyer, lines) = &scenario.orders[index];
        world.place(order_ids[index], users[*buyer], lines);
    };
    for step in &scenario.moves {
        match *step {
            Move::Place(pick) => place(&mut world, pick % scenario.orders.len()),
            Move::DeadlinePasses => {
                world.late = true;
                world.sweep();
            }
            _ if world.pending.is_empty() => {}
            Move::Deliver(pick) => {
                let index = pick % world.pending.len();
                world.deliver(vec![index], false)?;
            }
            Move::Redeliver(pick) => {
                let index = pick % world.pending.len();
                world.deliver(vec![index], true)?;
            }
            Move::Batch(pick, size) => {
                let indices = world.batch(pick, size);
                world.deliver(indices, false)?;
            }
            Move::Next {
                to,
                kind,
                count,
                keep,
            } => {
                let indices: Vec<usize> = (0..world.pending.len())
                    .filter(|&i| {
                        world.pending[i].to == to && world.pending[i].event.key().0 == kind
                    })
                    .take(count)
                    .collect();
                if indices.len() < count {
                    return Err(format!("fewer than {count} {kind} pending for {to:?}"));
                }
                world.deliver(indices, keep)?;
            }
        }
    }
    // Every order the script did not place is placed now (its user is
    // known once user.created reaches the order service).
    for round in 0.. {
        if round > 10_000 {
            return Err(format!("no end: still pending {:?}", world.pending));
        }
        for index in 0..scenario.orders.len() {
            place(&mut world, index);
        }
        if world.pending.is_empty() {
            break;
        }
        // The oldest event that can be decided goes next; one that cannot
        // waits behind the others.
        let index = round % world.pending.len();
        world.deliver(vec![index], false)?;
        // The sweeper runs now and then.
        if world.late && round % 3 == 0 {
            world.sweep();
        }
    }
    check(&world, &stocked)
}

fn check(world: &World, stocked: &HashMap<String, i64>) -> Result<(), String> {
    let fail = |what: String| Err(format!("{what}\nworld: {world:#?}"));
    for (id, row) in &world.orders {
        if row.status == Status::Pending {
            return fail(format!("order {id} is still PENDING"));
        }
        let held = world.reservations.get(id).map(|(status, _)| *status);
        let paid = world
            .payments
            .get(id)
            .map(|(status, amount, _)| (*status, *amount));
        match row.status {
            Status::Confirmed => {
                if held != Some(Held::Sold) {
                    return fail(format!("confirmed order {id} has reservation {held:?}"));
                }
                if paid != Some((PaymentStatus::Captured, row.total)) {
                    return fail(format!(
                        "confirmed order {id} (total {}) has payment {paid:?}",
                        row.total
                    ));
                }
            }
            Status::Cancelled => {
                if matches!(held, Some(Held::Reserved | Held::Sold)) {
                    return fail(format!("cancelled order {id} keeps reservation {held:?}"));
                }
                if matches!(paid, Some((PaymentStatus::Captured, _))) {
                    return fail(format!("cancelled order {id} keeps its capture"));
                }
            }
            Status::Pending => unreachable!(),
        }
    }
    for (sku, stock) in stocked {
        let available = world.stock[sku].available;
        let reserved = world.reserved.get(sku).copied().unwrap_or_default();
        let sold = world.sold.get(sku).copied().unwrap_or_default();
        if available < 0 || reserved < 0 || sold < 0 || available + reserved + sold != *stock {
            return fail(format!(
                "{sku}: available {available} + reserved {reserved} + sold {sold} against {stock} stocked"
            ));
        }
        if reserved != 0 {
            return fail(format!(
                "{sku}: {reserved} units still reserved after every saga ended"
            ));
        }
    }
    for (user, start) in &world.credit {
        let balance = world.balances.get(user).copied().unwrap_or_default();
        let kept: i64 = world
            .payments
            .values()
            .filter(|(status, _, payer)| *status == PaymentStatus::Captured && payer == user)
            .map(|(_, amount, _)| amount)
            .sum();
        if balance < 0 || balance + kept != *start {
            return fail(format!(
                "user {user}: balance {balance} + captured {kept} against a credit of {start}"
            ));
        }
    }
    for (what, log) in [("effect", &world.effects), ("event", &world.published)] {
        let mut seen = HashSet::new();
        for key in log {
            if !seen.insert(key) {
                return fail(format!("{what} {key:?} happened twice"));
            }
        }
    }
    Ok(())
}

fn cases() -> u32 {
    setting("MODEL_CASES", 3000)
}

fn seed() -> u64 {
    setting("MODEL_SEED", 1)
}

#[test]
fn every_interleaving_ends_every_saga_and_conserves_stock_and_money() {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed().to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: cases(),
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );
    if let Err(failure) = runner.run(&scenario(), |scenario| {
        play(&scenario).map_err(TestCaseError::fail)
    }) {
        panic!(
            "{failure}\nseed: MODEL_SEED={} MODEL_CASES={}",
            seed(),
            cases()
        );
    }
}

/// One buyer with 100 cents, "A" at 10 cents with 5 units, and one order of
/// one "A" each, placed once the order service knows the buyer.
fn one_buyer(orders: usize, moves: Vec<Move>) -> Scenario {
    let mut script = vec![next(Consumer::Order, "user.created")];
    script.extend((0..orders).map(Move::Place));
    script.extend(moves);
    Scenario {
        credits: vec![100],
        products: [(10, 5), (10, 0)],
        orders: vec![(0, vec![("A".into(), 1)]); orders],
        moves: script,
    }
}

/// The next event of this type to this consumer.
fn next(to: Consumer, kind: &'static str) -> Move {
    Move::Next {
        to,
        kind,
        count: 1,
        keep: false,
    }
}

/// The deadline cancels an order whose reservation is on its way to
/// payment, and the cancellation gets there first: the tombstone it leaves
/// keeps the late reservation from charging.
#[test]
fn a_cancellation_that_overtakes_the_charge_leaves_no_capture() {
    use Consumer::*;
    play(&one_buyer(
        1,
        vec![
            next(Payment, "user.created"),
            next(Inventory, "order.placed"),
            Move::DeadlinePasses,
            next(Payment, "order.cancelled"),
            next(Payment, "inventory.reserved"),
        ],
    ))
    .unwrap();
}

/// The cancellation reaches inventory before the order it cancels: the
/// tombstone keeps the late `order.placed` from reserving.
#[test]
fn a_cancellation_that_overtakes_the_order_reserves_nothing() {
    use Consumer::*;
    play(&one_buyer(
        1,
        vec![
            Move::DeadlinePasses,
            next(Inventory, "order.cancelled"),
            next(Inventory, "order.placed"),
        ],
    ))
    .unwrap();
}

/// A reservation delivered again after it was charged (an ack lost)
/// charges once; a capture that comes after the deadline cancels the
/// order and is refunded.
#[test]
fn a_redelivered_charge_captures_once_and_a_late_capture_is_refunded() {
    use Consumer::*;
    play(&one_buyer(
        1,
        vec![
            next(Payment, "user.created"),
            next(Inventory, "order.placed"),
            Move::Next {
                to: Payment,
                kind: "inventory.reserved",
                count: 1,
                keep: true,
            },
            next(Payment, "inventory.reserved"),
            Move::DeadlinePasses,
            next(Order, "payment.completed"),
        ],
    ))
    .unwrap();
}

/// Two orders charged in one batch before the wallet exists wait for it,
/// then take the balance in turn.
#[test]
fn a_batch_waits_for_its_wallet_then_charges_in_turn() {
    use Consumer::*;
    let mut scenario = one_buyer(
        2,
        vec![
            next(Inventory, "order.placed"),
            next(Inventory, "order.placed"),
            Move::Next {
                to: Payment,
                kind: "inventory.reserved",
                count: 2,
                keep: false,
            },
            next(Payment, "user.created"),
            Move::Next {
                to: Payment,
                kind: "inventory.reserved",
                count: 2,
                keep: false,
            },
        ],
    );
    scenario.credits = vec![15];
    play(&scenario).unwrap();
}

/// `name` from the environment, else `default`.
fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}
