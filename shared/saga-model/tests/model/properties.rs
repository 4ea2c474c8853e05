//! What must hold of the world: at every step ([`always`]), and once every
//! saga has ended ([`ended`]). The sampled model checks both at the end of
//! each script; the exhaustive check checks [`always`] in every state it
//! reaches and [`ended`] in every state from which nothing can happen.

use std::collections::BTreeMap;

use crate::script::{Consumer, Event};
use crate::world::World;
use shop_domain::OrderId;
use shop_inventory::domain::Status as Held;
use shop_order::domain::Status;
use shop_payment::domain::PaymentStatus;

/// What the world started with: the units stocked per SKU.
pub(crate) type Stocked = BTreeMap<String, i64>;

/// What holds in every state, mid-saga included:
///
/// - stock is conserved: per SKU, available + reserved + sold is what was
///   stocked, none below zero;
/// - money is conserved: with wallets, a user's balance and captures add
///   up to their credit, the balance never below zero; through the
///   provider, the wallets stay as opened and the provider never keeps more
///   of a payer than their credit;
/// - no side effect (reserve, release, sale, capture, charge, refund) and no
///   event happens twice for one order, so no order is charged twice;
/// - at most one terminal event (`order.confirmed` or `order.cancelled`)
///   per order;
/// - no cancelled order keeps a sale, and one that still holds a
///   reservation or a capture has the compensation that undoes it on its
///   way.
pub(crate) fn always(world: &World, stocked: &Stocked) -> Result<(), String> {
    for (sku, stock) in stocked {
        let available = world.stock[sku].available;
        let reserved = world.reserved.get(sku).copied().unwrap_or_default();
        let sold = world.sold.get(sku).copied().unwrap_or_default();
        if available < 0 || reserved < 0 || sold < 0 || available + reserved + sold != *stock {
            return Err(format!(
                "stock of {sku} not conserved: available {available} + reserved {reserved} + sold {sold} against {stock} stocked"
            ));
        }
    }
    for (user, start) in &world.credit {
        let Some(&balance) = world.balances.get(user) else {
            continue;
        };
        if world.provider {
            if balance != *start {
                return Err(format!(
                    "user {user}: the wallet moved to {balance} from {start} while paying through the provider"
                ));
            }
            let kept: i64 = world
                .ledger
                .values()
                .filter(|(succeeded, _, _, payer)| *succeeded && payer == user)
                .map(|(_, amount, refunded, _)| amount - refunded)
                .sum();
            if kept > *start {
                return Err(format!(
                    "user {user}: the provider keeps {kept} of a credit of {start}"
                ));
            }
            continue;
        }
        let captured: i64 = world
            .payments
            .values()
            .filter(|(status, _, payer)| *status == PaymentStatus::Captured && payer == user)
            .map(|(_, amount, _)| amount)
            .sum();
        if balance < 0 || balance + captured != *start {
            return Err(format!(
                "money of user {user} not conserved: balance {balance} + captured {captured} against a credit of {start}"
            ));
        }
    }
    for (what, counts) in [("effect", &world.effects), ("event", &world.published)] {
        if let Some(((kind, id), times)) = counts.iter().find(|(_, times)| **times > 1) {
            return Err(format!("{what} {kind} of {id} happened {times} times"));
        }
    }
    for (id, row) in &world.orders {
        let ends = ["order.confirmed", "order.cancelled"]
            .iter()
            .map(|kind| {
                world
                    .published
                    .get(&(*kind, id.get()))
                    .copied()
                    .unwrap_or(0)
            })
            .sum::<u32>();
        if ends > 1 {
            return Err(format!("order {id} ended twice"));
        }
        if row.status != Status::Cancelled {
            continue;
        }
        let held = world.reservations.get(id).map(|(status, _)| *status);
        if held == Some(Held::Sold) {
            return Err(format!("cancelled order {id} has a sale"));
        }
        if held == Some(Held::Reserved) && !compensation_on_its_way(world, *id, Consumer::Inventory)
        {
            return Err(format!(
                "cancelled order {id} keeps its reservation, and no compensation is on its way to the inventory service"
            ));
        }
        let captured = matches!(world.payments.get(id), Some((PaymentStatus::Captured, ..)));
        if captured && !compensation_on_its_way(world, *id, Consumer::Payment) {
            return Err(format!(
                "cancelled order {id} keeps its capture, and no compensation is on its way to the payment service"
            ));
        }
    }
    Ok(())
}

/// An `order.cancelled` or `payment.failed` of `order` is pending for `to`.
fn compensation_on_its_way(world: &World, order: OrderId, to: Consumer) -> bool {
    world.pending.iter().any(|delivery| {
        delivery.to == to
            && matches!(
                &delivery.event,
                Event::OrderCancelled { order: id, .. } | Event::PaymentFailed { order: id, .. }
                    if *id == order
            )
    })
}

/// What holds once nothing is left to happen, beside [`always`]:
///
/// - every placed order is CONFIRMED or CANCELLED;
/// - every user's wallet is open, and nothing is left reserved;
/// - a confirmed order has a sold reservation and exactly one capture of its
///   total (through the provider: exactly one charge of its total, not
///   refunded); a cancelled one keeps no reservation and no capture (and
///   the provider keeps nothing of it);
/// - no payment is left PENDING or REFUNDING.
pub(crate) fn ended(world: &World, stocked: &Stocked) -> Result<(), String> {
    for (id, row) in &world.orders {
        let held = world.reservations.get(id).map(|(status, _)| *status);
        let paid = world
            .payments
            .get(id)
            .map(|(status, amount, _)| (*status, *amount));
        match row.status {
            Status::Pending => return Err(format!("order {id} is still PENDING")),
            Status::Confirmed => {
                if held != Some(Held::Sold) {
                    return Err(format!("confirmed order {id} has reservation {held:?}"));
                }
                if paid != Some((PaymentStatus::Captured, row.total)) {
                    return Err(format!(
                        "confirmed order {id} (total {}) has payment {paid:?}",
                        row.total
                    ));
                }
            }
            Status::Cancelled => {
                if matches!(held, Some(Held::Reserved | Held::Sold)) {
                    return Err(format!("cancelled order {id} keeps reservation {held:?}"));
                }
                if matches!(paid, Some((PaymentStatus::Captured, _))) {
                    return Err(format!("cancelled order {id} keeps its capture"));
                }
            }
        }
    }
    for user in world.credit.keys() {
        if !world.balances.contains_key(user) {
            return Err(format!("the wallet of user {user} never opened"));
        }
    }
    for sku in stocked.keys() {
        let reserved = world.reserved.get(sku).copied().unwrap_or_default();
        if reserved != 0 {
            return Err(format!(
                "{sku}: {reserved} units still reserved after every saga ended"
            ));
        }
    }
    for (id, (status, amount, _)) in &world.payments {
        if matches!(status, PaymentStatus::Pending | PaymentStatus::Refunding) {
            return Err(format!("payment of {id} left {status:?} ({amount})"));
        }
    }
    if !world.provider {
        return Ok(());
    }
    for (id, row) in &world.orders {
        let kept = world
            .ledger
            .get(id)
            .filter(|(succeeded, ..)| *succeeded)
            .map_or(0, |(_, amount, refunded, _)| amount - refunded);
        let captured = match world.payments.get(id) {
            Some((PaymentStatus::Captured, amount, _)) => *amount,
            _ => 0,
        };
        if kept != captured {
            return Err(format!(
                "order {id}: the provider kept {kept}, the shop captured {captured}"
            ));
        }
        if row.status == Status::Confirmed
            && world.ledger.get(id).map(|(s, a, r, _)| (*s, *a, *r)) != Some((true, row.total, 0))
        {
            return Err(format!(
                "confirmed order {id} has no single charge of its total"
            ));
        }
    }
    Ok(())
}
