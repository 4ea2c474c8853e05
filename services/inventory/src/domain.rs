//! An order's reservation: its lines reserved all or none, released on a
//! failure, sold on a confirmation; and what a product may be. Pure: no I/O.

use std::collections::{HashMap, HashSet};

use shop_domain::{OrderId, StepError, UserId, limits};

/// A product's price and what can be reserved of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stock {
    pub price_cents: i64,
    pub available: i64,
}

/// One reserved line, priced.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Line {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
}

/// Why an order cannot be reserved, naming the SKU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub sku: String,
    pub reason: String,
}

/// Prices and reserves every line, or rejects the order at the first line
/// that cannot be had; nothing is reserved then. Lines are taken in SKU
/// order, so the rejection is the same whatever the order of the request.
pub fn reserve(
    items: &[(String, i64)],
    stock: &HashMap<String, Stock>,
) -> Result<(Vec<Line>, i64), Rejection> {
    let mut items = items.to_vec();
    items.sort();
    let mut lines = Vec::with_capacity(items.len());
    let mut total: i64 = 0;
    for (sku, quantity) in items {
        if quantity <= 0 {
            return Err(Rejection {
                reason: format!("quantity of {sku} must be positive, got {quantity}"),
                sku,
            });
        }
        let Some(product) = stock.get(&sku) else {
            return Err(Rejection {
                reason: format!("unknown SKU {sku}"),
                sku,
            });
        };
        if product.available < quantity {
            return Err(Rejection {
                reason: format!(
                    "out of stock: {sku} has {} available, {quantity} wanted",
                    product.available
                ),
                sku,
            });
        }
        total = quantity
            .checked_mul(product.price_cents)
            .and_then(|line| total.checked_add(line))
            .ok_or_else(|| Rejection {
                reason: format!("the price of {sku} overflows"),
                sku: sku.clone(),
            })?;
        lines.push(Line {
            sku,
            quantity,
            unit_price_cents: product.price_cents,
        });
    }
    Ok((lines, total))
}

shop_domain::labels! {
    /// Where an order's reservation stands. The row outlives the
    /// reservation: `Cancelled` is a tombstone for an order cancelled before
    /// it was seen.
    pub enum Status {
        Reserved = "RESERVED",
        Rejected = "REJECTED",
        Released = "RELEASED",
        Sold = "SOLD",
        Cancelled = "CANCELLED",
    }
}

/// An `order.placed` to reserve for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub order_id: OrderId,
    pub user_id: UserId,
    pub items: Vec<(String, i64)>,
}

/// What a reservation attempt decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// Every line reserved: `inventory.reserved`.
    Reserved { lines: Vec<Line>, total_cents: i64 },
    /// Nothing reserved: `inventory.rejected`.
    Rejected { sku: String, reason: String },
    /// The order was seen before (a redelivery, or a cancellation that
    /// overtook it): nothing to do.
    AlreadyDecided,
}

/// The reservation for several orders, one after another in the order given: each
/// reserves all its lines or none ([`reserve`]) from the stock the orders
/// before it left. `decided` holds the orders that have a reservation row
/// (a tombstone included) and gains the ones decided here; `stock` loses
/// the units reserved here.
pub fn reserve_in_turn(
    orders: &[Placed],
    decided: &mut HashSet<OrderId>,
    stock: &mut HashMap<String, Stock>,
) -> Vec<Reservation> {
    let mut reservations = Vec::with_capacity(orders.len());
    for order in orders {
        if !decided.insert(order.order_id) {
            reservations.push(Reservation::AlreadyDecided);
            continue;
        }
        match reserve(&order.items, stock) {
            Ok((lines, total_cents)) => {
                for line in &lines {
                    if let Some(product) = stock.get_mut(&line.sku) {
                        product.available -= line.quantity;
                    }
                }
                reservations.push(Reservation::Reserved { lines, total_cents });
            }
            Err(rejection) => reservations.push(Reservation::Rejected {
                sku: rejection.sku,
                reason: rejection.reason,
            }),
        }
    }
    reservations
}

/// What the release does to an order's reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Held: give the units back and mark it RELEASED
    /// (`inventory.released`).
    Release,
    /// Rejected, released already, or a tombstone: nothing.
    Nothing,
    /// Not seen yet: leave a tombstone so that the late `order.placed`
    /// reserves nothing.
    Tombstone,
}

/// The release for a failed order whose reservation stands at `status`
/// (none: no row). A sold one cannot be released: the order was confirmed.
pub fn release(order_id: OrderId, status: Option<Status>) -> Result<Release, StepError> {
    match status {
        Some(Status::Reserved) => Ok(Release::Release),
        Some(Status::Sold) => Err(StepError::Refused(format!(
            "order {order_id} is sold; a release cannot undo a confirmed order"
        ))),
        Some(Status::Rejected | Status::Released | Status::Cancelled) => Ok(Release::Nothing),
        None => Ok(Release::Tombstone),
    }
}

/// Whether the sale sells a confirmed order's reservation (`true`) or finds
/// it sold already (`false`). The reservation is this service's own doing
/// and comes before the confirmation: until it is visible, not yet; one
/// that is not held contradicts the confirmation.
pub fn sell(order_id: OrderId, status: Option<Status>) -> Result<bool, StepError> {
    match status {
        Some(Status::Reserved) => Ok(true),
        Some(Status::Sold) => Ok(false),
        Some(other) => Err(StepError::Refused(format!(
            "order {order_id} confirmed, but its reservation is {other}"
        ))),
        None => Err(StepError::NotYet(format!(
            "no reservation for confirmed order {order_id} yet"
        ))),
    }
}

/// A SKU as the catalogue takes it: 1 to 64 characters, no spaces around,
/// no NUL.
pub fn check_sku(sku: &str) -> Result<(), String> {
    match sku.chars().count() {
        0 => Err("sku is required".into()),
        n if n > 64 => Err(format!("sku must be at most 64 characters, got {n}")),
        _ if sku.trim() != sku => Err("sku must not start or end with spaces".into()),
        _ if sku.contains('\0') => Err("sku must not contain NUL characters".into()),
        _ => Ok(()),
    }
}

/// A new product that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewProduct {
    pub sku: String,
    /// Trimmed, 1 to 200 characters.
    pub name: String,
    pub price_cents: i64,
    pub stock: i64,
}

impl NewProduct {
    pub fn parse(sku: &str, name: &str, price_cents: i64, stock: i64) -> Result<Self, String> {
        check_sku(sku)?;
        let name = name.trim();
        if name.contains('\0') {
            return Err("name must not contain NUL characters".into());
        }
        if name.is_empty() || name.chars().count() > 200 {
            return Err("name must be 1 to 200 characters".into());
        }
        if !(0..=limits::MAX_PRICE_CENTS).contains(&price_cents) {
            return Err(format!(
                "price_cents must be 0 to {}, got {price_cents}",
                limits::MAX_PRICE_CENTS
            ));
        }
        if !(0..=limits::MAX_UNITS).contains(&stock) {
            return Err(format!(
                "stock must be 0 to {}, got {stock}",
                limits::MAX_UNITS
            ));
        }
        Ok(Self {
            sku: sku.to_owned(),
            name: name.to_owned(),
            price_cents,
            stock,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stock() -> HashMap<String, Stock> {
        HashMap::from([
            (
                "LAMP".to_owned(),
                Stock {
                    price_cents: 1999,
                    available: 5,
                },
            ),
            (
                "MUG".to_owned(),
                Stock {
                    price_cents: 500,
                    available: 1,
                },
            ),
        ])
    }

    #[test]
    fn reserves_and_prices_every_line() {
        let (lines, total) = reserve(&[("MUG".into(), 1), ("LAMP".into(), 2)], &stock()).unwrap();
        assert_eq!(total, 2 * 1999 + 500);
        assert_eq!(
            lines.iter().map(|l| l.sku.as_str()).collect::<Vec<_>>(),
            ["LAMP", "MUG"]
        );
    }

    #[test]
    fn rejects_the_whole_order_naming_the_sku() {
        let error = reserve(&[("LAMP".into(), 1), ("MUG".into(), 2)], &stock()).unwrap_err();
        assert_eq!(error.sku, "MUG");
        assert_eq!(error.reason, "out of stock: MUG has 1 available, 2 wanted");
        let error = reserve(&[("LAMP".into(), 1), ("NOPE".into(), 1)], &stock()).unwrap_err();
        assert_eq!(error.reason, "unknown SKU NOPE");
    }

    #[test]
    fn statuses_round_trip() {
        for status in Status::ALL {
            assert_eq!(Status::parse(status.as_str()), Ok(*status));
        }
    }

    #[test]
    fn a_release_gives_back_what_is_held_and_refuses_a_sale() {
        let id = OrderId::from(uuid::Uuid::nil());
        assert_eq!(release(id, Some(Status::Reserved)), Ok(Release::Release));
        assert_eq!(release(id, None), Ok(Release::Tombstone));
        for status in [Status::Rejected, Status::Released, Status::Cancelled] {
            assert_eq!(release(id, Some(status)), Ok(Release::Nothing));
        }
        assert!(matches!(
            release(id, Some(Status::Sold)),
            Err(StepError::Refused(_))
        ));
        assert_eq!(sell(id, Some(Status::Reserved)), Ok(true));
        assert_eq!(sell(id, Some(Status::Sold)), Ok(false));
        assert!(matches!(sell(id, None), Err(StepError::NotYet(_))));
        assert!(
            matches!(sell(id, Some(Status::Rejected)), Err(StepError::Refused(reason)) if reason.ends_with("its reservation is REJECTED"))
        );
    }
}
