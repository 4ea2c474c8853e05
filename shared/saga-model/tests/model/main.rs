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
//! event is delivered; then the invariants of [`properties`] are checked:
//! stock and money conserved, nothing twice, every order ended, no capture
//! or reservation outliving a cancellation, no step refused.
//!
//! [`exhaustive`] checks the same world through every interleaving for
//! small bounds (`docs/model-checking.md`).
//!
//! `MODEL_CASES` (default 3000) and `MODEL_SEED` (default 1) set the run;
//! a failure is shrunk to its smallest script and printed with its seed.

mod exhaustive;
mod explore;
mod properties;
mod script;
mod world;

use properties::Stocked;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use script::*;
use shop_domain::{OrderId, UserId};
use shop_inventory::domain::Stock;
use uuid::Uuid;
use world::*;

/// A scenario's world before anything happened: its products stocked,
/// its users created (`user.created` on its way), nothing placed.
pub(crate) struct Start {
    pub(crate) world: World,
    pub(crate) stocked: Stocked,
    pub(crate) users: Vec<UserId>,
    pub(crate) order_ids: Vec<OrderId>,
}

pub(crate) fn start(scenario: &Scenario) -> Start {
    let users: Vec<UserId> = (0..scenario.credits.len())
        .map(|i| Uuid::from_u128(0x1000 + i as u128).into())
        .collect();
    let order_ids: Vec<OrderId> = (0..scenario.orders.len())
        .map(|i| Uuid::from_u128(0x2000 + i as u128).into())
        .collect();
    let mut world = World {
        provider: scenario.provider,
        ..World::default()
    };
    let mut stocked = Stocked::new();
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
    Start {
        world,
        stocked,
        users,
        order_ids,
    }
}

/// Plays a scenario to its end and checks the invariants.
fn play(scenario: &Scenario) -> Result<(), String> {
    let Start {
        mut world,
        stocked,
        users,
        order_ids,
    } = start(scenario);
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
            Move::Retry => {
                world.retry();
            }
            _ if world.pending.is_empty() => {}
            Move::Lose(pick) => world.lose(pick),
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
        // Nothing on its way, yet a provider's outcome unknown: the
        // worker's next call.
        if world.pending.is_empty() && !world.retry() {
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

/// The invariants of [`properties::always`] and [`properties::ended`],
/// with the world that broke one.
fn check(world: &World, stocked: &Stocked) -> Result<(), String> {
    properties::always(world, stocked)
        .and_then(|()| properties::ended(world, stocked))
        .map_err(|what| format!("{what}\nworld: {world:#?}"))
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
        provider: false,
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

/// [`one_buyer`] paying through the provider.
fn through_provider(orders: usize, moves: Vec<Move>) -> Scenario {
    Scenario {
        provider: true,
        ..one_buyer(orders, moves)
    }
}

/// The charge's answer and its webhook arrive together and again (an ack
/// lost): one capture, one `payment.completed`.
#[test]
fn a_charge_told_twice_by_answer_and_webhook_captures_once() {
    use Consumer::*;
    play(&through_provider(
        1,
        vec![
            next(Inventory, "order.placed"),
            next(Payment, "inventory.reserved"),
            next(Provider, "provider charge call"),
            Move::Next {
                to: Payment,
                kind: "provider charged",
                count: 2,
                keep: true,
            },
            Move::Next {
                to: Payment,
                kind: "provider charged",
                count: 2,
                keep: false,
            },
        ],
    ))
    .unwrap();
}

/// The deadline cancels the order while its charge is on its way: the
/// charge, once made, is refunded, and the order is never confirmed.
#[test]
fn a_charge_in_flight_when_the_order_is_cancelled_is_refunded() {
    use Consumer::*;
    play(&through_provider(
        1,
        vec![
            next(Inventory, "order.placed"),
            next(Payment, "inventory.reserved"),
            Move::DeadlinePasses,
            next(Payment, "order.cancelled"),
            next(Provider, "provider charge call"),
            next(Payment, "provider charged"),
            next(Provider, "provider refund call"),
        ],
    ))
    .unwrap();
}

/// The answer and the webhook are both lost: the worker calls again under
/// the same key and learns the outcome; the provider charged once.
#[test]
fn an_outcome_lost_is_learnt_by_calling_again_under_the_same_key() {
    use Consumer::*;
    play(&through_provider(
        1,
        vec![
            next(Inventory, "order.placed"),
            next(Payment, "inventory.reserved"),
            next(Provider, "provider charge call"),
            Move::Lose(0),
            Move::Lose(0),
            Move::Retry,
            next(Provider, "provider charge call"),
            next(Payment, "provider charged"),
        ],
    ))
    .unwrap();
}
