//! Events as people read them.

use shop_proto::{inventory::v1 as inventory, order::v1 as order, payment::v1 as payment};

/// The key fields of an event, for people: what a timeline line shows.
pub fn describe(event_type: &str, body: &[u8]) -> String {
    fn decode<M: prost::Message + Default>(body: &[u8]) -> Result<M, String> {
        M::decode(body).map_err(|error| format!("undecodable body: {error}"))
    }
    fn lines<'a>(lines: impl Iterator<Item = (&'a str, i64)>) -> String {
        lines
            .map(|(sku, quantity)| format!("{quantity} x {sku}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
    let described = match event_type {
        "shop.user.v1.UserCreated" => decode::<shop_proto::user::v1::UserCreated>(body)
            .map(|e| format!("user {} <{}>", e.user_id, e.email)),
        "shop.order.v1.OrderPlaced" => decode::<order::OrderPlaced>(body).map(|e| {
            let items = lines(
                e.items
                    .iter()
                    .map(|i| (i.sku.as_str(), i64::from(i.quantity))),
            );
            format!("{items} for user {}", e.user_id)
        }),
        "shop.order.v1.OrderConfirmed" => {
            decode::<order::OrderConfirmed>(body).map(|e| format!("total {} cents", e.total_cents))
        }
        "shop.order.v1.OrderCancelled" => {
            decode::<order::OrderCancelled>(body).map(|e| format!("reason: {}", e.reason))
        }
        "shop.inventory.v1.InventoryReserved" => {
            decode::<inventory::InventoryReserved>(body).map(|e| {
                let held = lines(e.lines.iter().map(|l| (l.sku.as_str(), l.quantity)));
                format!("{held}, total {} cents", e.total_cents)
            })
        }
        "shop.inventory.v1.InventoryRejected" => decode::<inventory::InventoryRejected>(body)
            .map(|e| format!("reason: {} (sku {})", e.reason, e.sku)),
        "shop.inventory.v1.InventoryReleased" => {
            decode::<inventory::InventoryReleased>(body).map(|e| {
                let released = lines(e.lines.iter().map(|l| (l.sku.as_str(), l.quantity)));
                if released.is_empty() {
                    "nothing was held".to_owned()
                } else {
                    released
                }
            })
        }
        "shop.payment.v1.PaymentCompleted" => decode::<payment::PaymentCompleted>(body).map(|e| {
            format!(
                "{} cents captured{}",
                e.amount_cents,
                at_provider(e.provider.as_ref())
            )
        }),
        "shop.payment.v1.PaymentFailed" => decode::<payment::PaymentFailed>(body).map(|e| {
            format!(
                "{} cents, reason: {}{}",
                e.amount_cents,
                e.reason,
                at_provider(e.provider.as_ref())
            )
        }),
        "shop.payment.v1.PaymentRefunded" => decode::<payment::PaymentRefunded>(body).map(|e| {
            format!(
                "{} cents refunded{}",
                e.amount_cents,
                at_provider(e.provider.as_ref())
            )
        }),
        _ => Ok(format!(
            "{} bytes of an event type shopctl does not know",
            body.len()
        )),
    };
    described.unwrap_or_else(|error| error)
}

/// The payment provider's steps behind a payment event: its charge, the
/// calls it took, and whether its answer or its webhook told the outcome.
fn at_provider(trace: Option<&payment::ProviderTrace>) -> String {
    let Some(trace) = trace else {
        return String::new();
    };
    let charge = if trace.payment_id.is_empty() {
        String::new()
    } else {
        format!(" {}", trace.payment_id)
    };
    let calls = if trace.calls == 1 { "call" } else { "calls" };
    format!(
        " (payment provider{charge}: {} {calls}, told by its {})",
        trace.calls, trace.settled_by
    )
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    #[test]
    fn events_are_described_by_their_key_fields() {
        let placed = order::OrderPlaced {
            order_id: "o".into(),
            user_id: "u".into(),
            items: vec![
                order::OrderItem {
                    sku: "LAMP".into(),
                    quantity: 2,
                },
                order::OrderItem {
                    sku: "BULB".into(),
                    quantity: 1,
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            describe("shop.order.v1.OrderPlaced", &placed.encode_to_vec()),
            "2 x LAMP, 1 x BULB for user u"
        );
        let failed = payment::PaymentFailed {
            amount_cents: 500,
            reason: "insufficient funds".into(),
            ..Default::default()
        };
        assert_eq!(
            describe("shop.payment.v1.PaymentFailed", &failed.encode_to_vec()),
            "500 cents, reason: insufficient funds"
        );
        let captured = payment::PaymentCompleted {
            amount_cents: 500,
            provider: Some(payment::ProviderTrace {
                payment_id: "pay_7".into(),
                calls: 2,
                settled_by: "webhook".into(),
            }),
            ..Default::default()
        };
        assert_eq!(
            describe(
                "shop.payment.v1.PaymentCompleted",
                &captured.encode_to_vec()
            ),
            "500 cents captured (payment provider pay_7: 2 calls, told by its webhook)"
        );
        assert!(describe("shop.order.v1.OrderPlaced", &[0xff, 0xff]).starts_with("undecodable"));
        assert_eq!(
            describe("shop.order.v1.Later", &[1, 2, 3]),
            "3 bytes of an event type shopctl does not know"
        );
    }
}
