//! Reserving an order's lines, all or none. Pure: no I/O.

use std::collections::HashMap;

/// A product's price and what can be reserved of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stock {
    pub(crate) price_cents: i64,
    pub(crate) available: i64,
}

/// One reserved line, priced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Line {
    pub(crate) sku: String,
    pub(crate) quantity: i64,
    pub(crate) unit_price_cents: i64,
}

/// Why an order cannot be reserved, naming the SKU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub(crate) sku: String,
    pub(crate) reason: String,
}

/// Prices and reserves every line, or rejects the order at the first line
/// that cannot be had; nothing is reserved then. Lines are taken in SKU
/// order, so the rejection is the same whatever the order of the request.
pub(crate) fn reserve(
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

/// Where an order's reservation stands. The row outlives the reservation:
/// `Cancelled` is a tombstone for an order cancelled before it was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Reserved,
    Rejected,
    Released,
    Sold,
    Cancelled,
}

impl Status {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Reserved => "RESERVED",
            Self::Rejected => "REJECTED",
            Self::Released => "RELEASED",
            Self::Sold => "SOLD",
            Self::Cancelled => "CANCELLED",
        }
    }

    pub(crate) fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "RESERVED" => Self::Reserved,
            "REJECTED" => Self::Rejected,
            "RELEASED" => Self::Released,
            "SOLD" => Self::Sold,
            "CANCELLED" => Self::Cancelled,
            _ => return None,
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
        for status in [
            Status::Reserved,
            Status::Rejected,
            Status::Released,
            Status::Sold,
            Status::Cancelled,
        ] {
            assert_eq!(Status::parse(status.as_str()), Some(status));
        }
    }
}
