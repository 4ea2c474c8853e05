//! The saga checked exhaustively: the same [`World`] and the same decision
//! functions as the sampled model, every interleaving of the network's and
//! the services' actions explored up to small bounds ([`explore`]).
//!
//! In a state, any of these may happen next:
//!
//! - an order is placed (once its buyer is known to the order service);
//! - any pending event is delivered to its consumer and acked;
//! - one is delivered and its ack lost, so that it comes again later and
//!   the decisions must absorb it with no inbox (once per event);
//! - several pending events of one kind are delivered to their consumer as
//!   one batch (up to [`Limits::batch`]);
//! - the deadline passes (once), and then the sweeper runs;
//! - through the provider: a call, an answer or a webhook is lost (up to
//!   [`Limits::losses`]), and the payment worker calls again under the same
//!   key for every outcome it does not know; it does so whenever nothing
//!   it sent is on its way, and up to [`Limits::eager_retries`] times while
//!   something is (a slow answer taken for a lost one).
//!
//! [`properties::always`] is checked in every state. Where nothing leads
//! elsewhere, every event has been handled and [`properties::ended`] must
//! hold: every order ended, nothing PENDING or REFUNDING. The graph has no
//! cycle (the checker proves it), so every run comes to such a state: the
//! world's fairness is that the network delivers, the sweeper sweeps and
//! the worker calls again, for as long as there is something to do.

use std::collections::BTreeMap;

use crate::explore::{Counterexample, Model, Report, explore};
use crate::properties::{self, Stocked};
use crate::script::{Consumer, Delivery, Event, Scenario, Via};
use crate::world::{Bug, World};
use crate::{Start, start};
use shop_payment::domain::PaymentStatus;
use uuid::Uuid;

/// How far the network and the provider may misbehave.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Acks that may be lost, each making its event come again (an event
    /// is redelivered at most once).
    pub(crate) redeliveries: u8,
    /// The most events one batch holds (1: no batches).
    pub(crate) batch: usize,
    /// Calls, answers and webhooks of the provider that may be lost.
    pub(crate) losses: u8,
    /// Calls again while an answer is still on its way.
    pub(crate) eager_retries: u8,
}

/// The world of a scenario, with what is left of the limits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct State {
    world: World,
    redeliveries: u8,
    losses: u8,
    eager_retries: u8,
}

#[derive(Debug, Clone)]
pub(crate) enum Action {
    Place(usize),
    DeadlinePasses,
    Sweep,
    SweepWrites,
    Retry,
    Deliver(Delivery),
    Redeliver(Delivery),
    Batch(Vec<Delivery>),
    Lose(Delivery),
}

/// A scenario's orders, products and users (its script unused: the checker
/// takes every move), under limits, with perhaps one seeded mistake.
pub(crate) struct Saga {
    scenario: Scenario,
    limits: Limits,
    start: Start,
}

impl Saga {
    pub(crate) fn new(scenario: Scenario, limits: Limits, bug: Option<Bug>) -> Self {
        let mut start = start(&scenario);
        start.world.bug = bug;
        start.world.pending.sort();
        Self {
            scenario,
            limits,
            start,
        }
    }

    /// Explores every state; a counterexample names orders and users as
    /// its path does.
    pub(crate) fn check(&self) -> Result<Report, Counterexample> {
        explore(self).map_err(|mut found| {
            let ids = self.start.order_ids.iter().map(|id| id.get());
            for id in ids.chain(self.start.users.iter().map(|id| id.get())) {
                let name = self.name(id);
                let (kind, _) = name.split_once(' ').expect("a kind and a number");
                found.violation = found
                    .violation
                    .replace(&format!("{kind} {id}"), &name)
                    .replace(&id.to_string(), &name);
            }
            found
        })
    }

    fn stocked(&self) -> &Stocked {
        &self.start.stocked
    }

    /// "order 1", "user 2": the names a path is read by.
    fn name(&self, id: Uuid) -> String {
        let n = id.as_u128();
        match n {
            0x2000.. => format!("order {}", n - 0x2000 + 1),
            _ => format!("user {}", n - 0x1000 + 1),
        }
    }

    fn event(&self, event: &Event) -> String {
        let (kind, id) = event.key();
        let how = match event {
            Event::Charged { succeeded, via, .. } => format!(
                " ({}, by {})",
                if *succeeded { "succeeded" } else { "declined" },
                via_name(*via)
            ),
            Event::RefundDone { via, .. } => format!(" (by {})", via_name(*via)),
            _ => String::new(),
        };
        format!("{kind} of {}{how}", self.name(id))
    }

    fn delivery(&self, delivery: &Delivery) -> String {
        let again = if delivery.redelivered { ", again" } else { "" };
        format!(
            "{} to {}{again}",
            self.event(&delivery.event),
            consumer_name(delivery.to)
        )
    }
}

fn via_name(via: Via) -> &'static str {
    match via {
        Via::Answer => "its answer",
        Via::Webhook => "webhook",
    }
}

fn consumer_name(to: Consumer) -> &'static str {
    match to {
        Consumer::Order => "order",
        Consumer::Inventory => "inventory",
        Consumer::Payment => "payment",
        Consumer::Provider => "the provider",
    }
}

fn unknown_outcome(world: &World) -> bool {
    world
        .payments
        .values()
        .any(|(status, ..)| matches!(status, PaymentStatus::Pending | PaymentStatus::Refunding))
}

impl Model for Saga {
    type State = State;
    type Action = Action;

    fn init(&self) -> State {
        State {
            world: self.start.world.clone(),
            redeliveries: self.limits.redeliveries,
            losses: self.limits.losses,
            eager_retries: self.limits.eager_retries,
        }
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        let world = &state.world;
        for (index, (buyer, _)) in self.scenario.orders.iter().enumerate() {
            if !world.orders.contains_key(&self.start.order_ids[index])
                && world.known_users.contains(&self.start.users[*buyer])
            {
                actions.push(Action::Place(index));
            }
        }
        if !world.late {
            actions.push(Action::DeadlinePasses);
        } else {
            actions.push(Action::Sweep);
        }
        if !world.swept.is_empty() {
            actions.push(Action::SweepWrites);
        }
        let in_flight = world.pending.iter().any(|d| d.event.at_provider());
        if unknown_outcome(world) && (!in_flight || state.eager_retries > 0) {
            actions.push(Action::Retry);
        }
        // `pending` is kept sorted: equal deliveries sit together.
        let mut distinct: Vec<&Delivery> = world.pending.iter().collect();
        distinct.dedup();
        for delivery in &distinct {
            actions.push(Action::Deliver((*delivery).clone()));
            if state.redeliveries > 0 && !delivery.redelivered {
                actions.push(Action::Redeliver((*delivery).clone()));
            }
            if delivery.event.at_provider() && state.losses > 0 {
                actions.push(Action::Lose((*delivery).clone()));
            }
        }
        // Batches: the events of one kind for one stream consumer (the
        // provider's calls are HTTP requests, one at a time).
        let mut kinds: BTreeMap<(Consumer, &str), Vec<&Delivery>> = BTreeMap::new();
        for delivery in distinct {
            if delivery.to != Consumer::Provider {
                kinds
                    .entry((delivery.to, delivery.event.key().0))
                    .or_default()
                    .push(delivery);
            }
        }
        for group in kinds.values().filter(|group| group.len() > 1) {
            for mask in 1u32..(1 << group.len()) {
                let size = mask.count_ones() as usize;
                if size < 2 || size > self.limits.batch {
                    continue;
                }
                let batch = (0..group.len())
                    .filter(|i| mask & (1 << i) != 0)
                    .map(|i| group[i].clone())
                    .collect();
                actions.push(Action::Batch(batch));
            }
        }
    }

    fn next(&self, state: &State, action: &Action) -> Result<State, String> {
        let mut next = state.clone();
        let world = &mut next.world;
        let at = |world: &World, delivery: &Delivery| {
            world
                .pending
                .iter()
                .position(|pending| pending == delivery)
                .expect("a delivery offered is pending")
        };
        match action {
            Action::Place(index) => {
                let (buyer, lines) = &self.scenario.orders[*index];
                world.place(
                    self.start.order_ids[*index],
                    self.start.users[*buyer],
                    lines,
                );
            }
            Action::DeadlinePasses => world.late = true,
            Action::Sweep => world.sweep(),
            Action::SweepWrites => world.sweep_writes(),
            Action::Retry => {
                if world.pending.iter().any(|d| d.event.at_provider()) {
                    next.eager_retries -= 1;
                }
                world.retry();
            }
            Action::Deliver(delivery) => {
                let index = at(world, delivery);
                world.deliver(vec![index], false)?;
            }
            Action::Redeliver(delivery) => {
                let index = at(world, delivery);
                world.deliver(vec![index], true)?;
                next.redeliveries -= 1;
            }
            Action::Batch(batch) => {
                let indices = batch.iter().map(|d| at(world, d)).collect();
                world.deliver(indices, false)?;
            }
            Action::Lose(delivery) => {
                let index = at(world, delivery);
                world.pending.remove(index);
                next.losses -= 1;
            }
        }
        next.world.pending.sort();
        Ok(next)
    }

    fn always(&self, state: &State) -> Result<(), String> {
        properties::always(&state.world, self.stocked())
    }

    fn ended(&self, state: &State) -> Result<(), String> {
        if let Some(stuck) = state.world.pending.first() {
            return Err(format!("{} can never be handled", self.delivery(stuck)));
        }
        properties::ended(&state.world, self.stocked())
    }

    fn describe(&self, action: &Action) -> String {
        match action {
            Action::Place(index) => {
                let (buyer, lines) = &self.scenario.orders[*index];
                let lines: Vec<String> = lines
                    .iter()
                    .map(|(sku, quantity)| format!("{quantity} {sku}"))
                    .collect();
                format!(
                    "user {} places order {} ({})",
                    buyer + 1,
                    index + 1,
                    lines.join(", ")
                )
            }
            Action::DeadlinePasses => "the deadline passes".into(),
            Action::Sweep if self.start.world.bug == Some(Bug::SweepDoesNotRecheck) => {
                "the sweeper reads which orders are PENDING past their deadline".into()
            }
            Action::Sweep => "the sweeper cancels what is PENDING past its deadline".into(),
            Action::SweepWrites => "the sweeper writes the cancellations it read".into(),
            Action::Retry => "the payment worker calls the provider again".into(),
            Action::Deliver(delivery) => format!("deliver {}", self.delivery(delivery)),
            Action::Redeliver(delivery) => {
                format!("deliver {}; its ack is lost", self.delivery(delivery))
            }
            Action::Batch(batch) => {
                let events: Vec<String> = batch.iter().map(|d| self.event(&d.event)).collect();
                format!(
                    "deliver to {} as one batch: {}",
                    consumer_name(batch[0].to),
                    events.join(", ")
                )
            }
            Action::Lose(delivery) => format!("lose {}", self.delivery(delivery)),
        }
    }
}

/// Every misbehaviour the checker knows, once or twice each.
pub(crate) const LIMITS: Limits = Limits {
    redeliveries: 1,
    batch: 2,
    losses: 1,
    eager_retries: 1,
};

/// One buyer with `credit` cents; "A" at 10 cents with `stock` units;
/// `orders` orders of one "A" each.
fn one_product(provider: bool, credit: i64, stock: i64, orders: usize) -> Scenario {
    Scenario {
        credits: vec![credit],
        products: [(10, stock), (10, 0)],
        orders: vec![(0, vec![("A".into(), 1)]); orders],
        moves: Vec::new(),
        provider,
    }
}

/// One exhaustive check: a scenario and how far the world may misbehave.
pub(crate) struct Bound {
    pub(crate) name: &'static str,
    pub(crate) scenario: Scenario,
    pub(crate) limits: Limits,
}

/// The bounds `scripts/check` runs: the largest that finish in about a
/// minute here together. Two orders of one buyer, where one of them
/// overdraws the stock or the buyer's credit; through the provider, whose
/// calls, answers and webhooks multiply the interleavings, two orders
/// with a well-behaved network and one order with everything.
pub(crate) fn bounds() -> Vec<Bound> {
    let network = Limits {
        redeliveries: 2,
        batch: 2,
        losses: 0,
        eager_retries: 0,
    };
    let calm = Limits {
        redeliveries: 0,
        batch: 2,
        losses: 0,
        eager_retries: 0,
    };
    let stormy = Limits {
        redeliveries: 2,
        batch: 2,
        losses: 1,
        eager_retries: 1,
    };
    vec![
        Bound {
            name: "wallets: two orders, one unit",
            scenario: one_product(false, 100, 1, 2),
            limits: network,
        },
        Bound {
            name: "wallets: two orders, credit for one",
            scenario: one_product(false, 15, 5, 2),
            limits: network,
        },
        Bound {
            name: "provider: two orders, one unit",
            scenario: one_product(true, 100, 1, 2),
            limits: calm,
        },
        Bound {
            name: "provider: two orders, credit for one",
            scenario: one_product(true, 15, 5, 2),
            limits: calm,
        },
        Bound {
            name: "provider: one order",
            scenario: one_product(true, 100, 5, 1),
            limits: stormy,
        },
    ]
}

fn passes(scenario: Scenario) -> Report {
    match Saga::new(scenario, LIMITS, None).check() {
        Ok(report) => report,
        Err(found) => panic!("{found}"),
    }
}

/// The counterexample found for a seeded mistake, which
/// `docs/model-checking.md` shows and explains word for word.
fn found(scenario: Scenario, bug: Bug) -> Counterexample {
    let found = Saga::new(scenario, LIMITS, Some(bug))
        .check()
        .expect_err("the seeded mistake is found");
    eprintln!("{bug:?}: {found}");
    let docs = include_str!("../../../../docs/model-checking.md");
    assert!(
        docs.contains(&format!("```text\n{found}\n```")),
        "docs/model-checking.md does not show the path found for {bug:?}:\n{found}"
    );
    found
}

#[test]
fn one_order_through_the_wallets_is_checked_exhaustively() {
    let report = passes(one_product(false, 100, 5, 1));
    assert!(report.states > 100, "{report:?}");
}

#[test]
fn one_order_through_the_provider_is_checked_exhaustively() {
    let report = passes(one_product(true, 100, 5, 1));
    assert!(report.states > 100, "{report:?}");
}

#[test]
fn a_settle_that_ignores_a_cancellation_is_found() {
    let found = found(one_product(true, 100, 5, 1), Bug::SettleIgnoresCancellation);
    assert!(found.violation.contains("keeps its capture"), "{found}");
}

#[test]
fn a_release_that_forgets_its_tombstone_is_found() {
    let found = found(one_product(false, 100, 5, 1), Bug::ReleaseForgetsTombstone);
    assert!(found.violation.contains("keeps its reservation"), "{found}");
}

#[test]
fn a_sweep_that_does_not_read_the_status_again_is_found() {
    let found = found(one_product(false, 100, 5, 1), Bug::SweepDoesNotRecheck);
    assert_eq!(
        found.violation, "event order.cancelled of order 1 happened 2 times",
        "{found}"
    );
    assert_eq!(found.path.len(), 9, "{found}");
}

/// The bounds of [`bounds`], run by `scripts/check` on their own (a minute
/// of both cores) with their figures printed: one bound per core at a
/// time, so that each one's time is its own.
#[test]
#[ignore = "scripts/check runs it on its own: a minute of both cores"]
fn every_interleaving_of_two_orders_is_checked() {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let started = std::time::Instant::now();
    let bounds = bounds();
    let taken = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    std::thread::scope(|scope| {
        for _ in 0..cores.min(bounds.len()) {
            scope.spawn(|| {
                while let Some(bound) = bounds.get(taken.fetch_add(1, Ordering::Relaxed)) {
                    let result = Saga::new(bound.scenario.clone(), bound.limits, None).check();
                    results
                        .lock()
                        .expect("no checker panicked")
                        .push((bound.name, result));
                }
            });
        }
    });
    let mut results = results.into_inner().expect("no checker panicked");
    results.sort_by_key(|(name, _)| bounds.iter().position(|bound| bound.name == *name));
    eprintln!(
        "{:<38} {:>9} {:>11} {:>6} {:>5} {:>7}",
        "bounds", "states", "transitions", "ends", "depth", "seconds"
    );
    let mut failures = Vec::new();
    for (name, result) in results {
        match result {
            Ok(report) => eprintln!(
                "{name:<38} {:>9} {:>11} {:>6} {:>5} {:>7.1}",
                report.states,
                report.transitions,
                report.ends,
                report.depth,
                report.elapsed.as_secs_f64()
            ),
            Err(found) => failures.push(format!("{name}: {found}")),
        }
    }
    eprintln!(
        "all, on {cores} cores: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
