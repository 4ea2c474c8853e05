//! A scenario: the consumers, the events and their deliveries, and the
//! moves of a script, generated.

use std::collections::HashSet;

use proptest::prelude::*;
use shop_domain::{OrderId, UserId};
use uuid::Uuid;

/// The consumers, one durable consumer each in the real system, and the
/// payment provider (the world outside the shop, reached over HTTP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Consumer {
    Order,
    Inventory,
    Payment,
    Provider,
}

/// How the provider told the payment service an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Via {
    /// The call's own answer.
    Answer,
    /// A webhook.
    Webhook,
}

/// The saga's events, with what their consumers read of them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Event {
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
    /// The payment service's call to charge the provider (key: the order).
    ChargeCall {
        order: OrderId,
        user: UserId,
        amount: i64,
    },
    /// The provider's outcome of a charge, by answer or webhook.
    Charged {
        order: OrderId,
        succeeded: bool,
        via: Via,
    },
    /// The payment service's call to refund an order's charge.
    RefundCall {
        order: OrderId,
    },
    /// The provider's outcome of a refund.
    RefundDone {
        order: OrderId,
        via: Via,
    },
}

impl Event {
    /// The event's type and the order it is about: what may happen once.
    pub(crate) fn key(&self) -> (&'static str, Uuid) {
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
            Self::ChargeCall { order, .. } => ("provider charge call", order.get()),
            Self::Charged { order, .. } => ("provider charged", order.get()),
            Self::RefundCall { order } => ("provider refund call", order.get()),
            Self::RefundDone { order, .. } => ("provider refunded", order.get()),
        }
    }

    /// Traffic between the payment service and the provider (HTTP calls,
    /// answers, webhooks), not events on the streams: a call is made again
    /// on purpose, and the same key answers again.
    pub(crate) fn at_provider(&self) -> bool {
        matches!(
            self,
            Self::ChargeCall { .. }
                | Self::Charged { .. }
                | Self::RefundCall { .. }
                | Self::RefundDone { .. }
        )
    }

    /// Who consumes it, as in DESIGN.md's saga table.
    pub(crate) fn consumers(&self) -> &'static [Consumer] {
        use Consumer::*;
        match self {
            Self::UserCreated { .. } => &[Order, Payment],
            Self::OrderPlaced { .. } | Self::OrderConfirmed { .. } => &[Inventory],
            Self::Reserved { .. } => &[Order, Payment],
            Self::Rejected { .. } | Self::PaymentCompleted { .. } => &[Order],
            Self::PaymentFailed { .. } => &[Order, Inventory],
            Self::OrderCancelled { .. } => &[Inventory, Payment],
            Self::Released { .. } | Self::Refunded { .. } => &[],
            Self::ChargeCall { .. } | Self::RefundCall { .. } => &[Provider],
            Self::Charged { .. } | Self::RefundDone { .. } => &[Payment],
        }
    }
}

/// One event on its way to one consumer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Delivery {
    pub(crate) to: Consumer,
    pub(crate) event: Event,
    /// Handled once already, its ack lost: this is its redelivery.
    pub(crate) redelivered: bool,
}

/// A move of the script; the numbers pick among what is pending.
#[derive(Debug, Clone)]
pub(crate) enum Move {
    Deliver(usize),
    Redeliver(usize),
    Batch(usize, usize),
    Place(usize),
    DeadlinePasses,
    /// A pending call, answer or webhook of the provider's is lost (a
    /// timeout, a connection dropped, a webhook given up).
    Lose(usize),
    /// The payment service's worker calls the provider again for every
    /// payment whose outcome it does not know.
    Retry,
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
pub(crate) struct Scenario {
    pub(crate) credits: Vec<i64>,
    /// Price and stock of SKUs "A" and "B".
    pub(crate) products: [(i64, i64); 2],
    /// Buyer (an index into the users) and lines of each order.
    pub(crate) orders: Vec<(usize, Vec<(String, i32)>)>,
    pub(crate) moves: Vec<Move>,
    /// Payments through the provider instead of the wallets.
    pub(crate) provider: bool,
}

pub(crate) fn scenario() -> impl Strategy<Value = Scenario> {
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
            1 => any::<usize>().prop_map(Move::Lose),
            1 => Just(Move::Retry),
        ],
        0..60,
    );
    (
        prop::collection::vec(0i64..3000, 1..4),
        [(1i64..1500, 0i64..6), (1i64..1500, 0i64..6)],
        prop::collection::vec((any::<usize>(), lines), 1..5),
        moves,
        any::<bool>(),
    )
        .prop_map(|(credits, products, orders, moves, provider)| Scenario {
            orders: orders
                .into_iter()
                .map(|(user, lines)| (user % credits.len(), lines))
                .collect(),
            credits,
            products,
            moves,
            provider,
        })
}
