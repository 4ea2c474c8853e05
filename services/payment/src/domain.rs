//! A wallet's rules: what a deposit may be, how reserved orders are charged
//! one after another, and what a cancellation does to a payment. Pure.

use std::collections::{HashMap, HashSet};

use shop_domain::{OrderId, StepError, UserId, limits};

shop_domain::labels! {
    /// Where an order's payment stands.
    pub enum PaymentStatus {
        Captured = "CAPTURED",
        Declined = "DECLINED",
        Refunded = "REFUNDED",
        /// A tombstone: the order was cancelled before any capture, so a
        /// late reservation must not debit the wallet.
        Cancelled = "CANCELLED",
        /// Sent to the provider; the outcome is not known yet.
        Pending = "PENDING",
        /// Captured by the provider and owed back: the refund is due.
        Refunding = "REFUNDING",
    }
}

/// A deposit request that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deposit {
    /// 1 to [`limits::MAX_DEPOSIT_CENTS`].
    pub amount_cents: i64,
    /// The request's idempotency key; none when it was empty.
    pub key: Option<String>,
}

impl Deposit {
    /// Checks an amount and an idempotency key
    /// ([`shop_domain::idempotency_key`]).
    pub fn parse(amount_cents: i64, idempotency_key: &str) -> Result<Self, String> {
        if !(1..=limits::MAX_DEPOSIT_CENTS).contains(&amount_cents) {
            return Err(format!(
                "amount_cents must be 1 to {}, got {amount_cents}",
                limits::MAX_DEPOSIT_CENTS
            ));
        }
        Ok(Self {
            amount_cents,
            key: shop_domain::idempotency_key(idempotency_key)?,
        })
    }

    /// The balance after this deposit, if it stays within
    /// [`limits::MAX_BALANCE_CENTS`].
    pub fn credit(&self, balance: i64) -> Option<i64> {
        balance
            .checked_add(self.amount_cents)
            .filter(|new_balance| *new_balance <= limits::MAX_BALANCE_CENTS)
    }
}

/// A reserved order to charge (`inventory.reserved`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    pub order_id: OrderId,
    pub user_id: UserId,
    pub amount_cents: i64,
}

/// What a charge decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Debit {
    /// The wallet covered it: `payment.completed`.
    Captured,
    /// It did not: `payment.failed` with this reason.
    Declined(String),
    /// Seen before (a redelivery, or a cancellation that overtook it): no
    /// effect, no event.
    AlreadyDecided,
}

impl Debit {
    /// The payment row it leaves, if any.
    pub fn status(&self) -> Option<PaymentStatus> {
        match self {
            Self::Captured => Some(PaymentStatus::Captured),
            Self::Declined(_) => Some(PaymentStatus::Declined),
            Self::AlreadyDecided => None,
        }
    }
}

/// The payment for several charges, one after another in the order given: each
/// debits its wallet if the balance the ones before it left covers it.
/// `decided` holds the orders that have a payment row (a capture, a decline
/// or a tombstone) and gains the ones decided here; `balances` the wallets,
/// debited here. A wallet not opened yet (`user.created` comes on another
/// stream) is [`StepError::NotYet`]; the caller then writes nothing.
pub fn debit_in_turn(
    charges: &[Charge],
    decided: &mut HashSet<OrderId>,
    balances: &mut HashMap<UserId, i64>,
) -> Result<Vec<Debit>, StepError> {
    let mut debits = Vec::with_capacity(charges.len());
    for charge in charges {
        if charge.amount_cents < 0 {
            return Err(StepError::Refused(format!(
                "negative total {}",
                charge.amount_cents
            )));
        }
        if !decided.insert(charge.order_id) {
            debits.push(Debit::AlreadyDecided);
            continue;
        }
        let balance = balances.get_mut(&charge.user_id).ok_or_else(|| {
            StepError::NotYet(format!("no wallet for user {} yet", charge.user_id))
        })?;
        let amount = charge.amount_cents;
        if *balance >= amount {
            *balance -= amount;
            debits.push(Debit::Captured);
        } else {
            debits.push(Debit::Declined(format!(
                "insufficient funds: balance {balance} cents, order {amount} cents"
            )));
        }
    }
    Ok(debits)
}

/// What the refund does to an order's payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refund {
    /// Captured: give the amount back and mark it REFUNDED
    /// (`payment.refunded`).
    Refund,
    /// Declined or refunded already, or a tombstone: nothing.
    Nothing,
    /// Not charged yet: leave a tombstone so that the late reservation
    /// charges nothing.
    Tombstone,
}

/// The refund for a cancelled order whose payment stands at `status`
/// (none: no row).
pub fn refund(status: Option<PaymentStatus>) -> Refund {
    match status {
        Some(PaymentStatus::Captured) => Refund::Refund,
        Some(
            PaymentStatus::Declined
            | PaymentStatus::Refunded
            | PaymentStatus::Cancelled
            // A provider's (see `cancel_at_provider`).
            | PaymentStatus::Pending
            | PaymentStatus::Refunding,
        ) => Refund::Nothing,
        None => Refund::Tombstone,
    }
}

/// What the refund does when payments go through a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderCancel {
    /// Not charged yet: a tombstone, as with the wallet.
    Tombstone,
    /// The charge is in flight: ask that it be refunded if it succeeds.
    RefundIfCaptured,
    /// Captured: REFUNDING, refunded through the provider
    /// (`payment.refunded` once it has).
    Refund,
    /// Declined, refunded or being refunded already, or a tombstone.
    Nothing,
}

/// The refund for a provider's payment standing at `status`.
pub fn cancel_at_provider(status: Option<PaymentStatus>) -> ProviderCancel {
    match status {
        None => ProviderCancel::Tombstone,
        Some(PaymentStatus::Pending) => ProviderCancel::RefundIfCaptured,
        Some(PaymentStatus::Captured) => ProviderCancel::Refund,
        Some(
            PaymentStatus::Declined
            | PaymentStatus::Refunded
            | PaymentStatus::Refunding
            | PaymentStatus::Cancelled,
        ) => ProviderCancel::Nothing,
    }
}

/// What the provider said of a charge, by its answer or by a webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Charged {
    Succeeded,
    /// With the provider's reason.
    Declined(String),
}

/// What a charge's outcome does to its payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// CAPTURED, `payment.completed`.
    Capture,
    /// Captured for an order cancelled meanwhile: REFUNDING, no event
    /// until the refund is made.
    CaptureToRefund,
    /// DECLINED, `payment.failed` with this reason.
    Decline(String),
    /// Settled before (by the other of answer and webhook, or another
    /// replica): nothing.
    Nothing,
}

/// The outcome `charged` of a payment standing at `status`.
pub fn settle(status: PaymentStatus, cancel_requested: bool, charged: Charged) -> Settle {
    match (status, charged) {
        (PaymentStatus::Pending, Charged::Succeeded) if cancel_requested => Settle::CaptureToRefund,
        (PaymentStatus::Pending, Charged::Succeeded) => Settle::Capture,
        (PaymentStatus::Pending, Charged::Declined(reason)) => Settle::Decline(reason),
        _ => Settle::Nothing,
    }
}

/// The balance after refunding `amount`. Deposits stop at
/// [`limits::MAX_BALANCE_CENTS`], so a refund fits unless thousands of the
/// largest orders were captured and refunded to one wallet: then say so
/// rather than fail in SQL.
pub fn refunded(user_id: UserId, balance: i64, amount: i64) -> Result<i64, StepError> {
    balance.checked_add(amount).ok_or_else(|| {
        StepError::Refused(format!(
            "refunding {amount} cents to {user_id} would overflow its balance of {balance} cents"
        ))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn deposits_are_checked_with_reasons() {
        assert_eq!(
            Deposit::parse(5, "k").unwrap(),
            Deposit {
                amount_cents: 5,
                key: Some("k".into())
            }
        );
        assert_eq!(Deposit::parse(5, "").unwrap().key, None);
        assert!(Deposit::parse(0, "").unwrap_err().contains("1 to"));
        assert!(
            Deposit::parse(limits::MAX_DEPOSIT_CENTS + 1, "")
                .unwrap_err()
                .contains("1 to")
        );
        assert!(Deposit::parse(1, &"k".repeat(201)).is_err());
        assert!(Deposit::parse(1, "a\0b").unwrap_err().contains("NUL"));
        let deposit = Deposit::parse(10, "").unwrap();
        assert_eq!(deposit.credit(5), Some(15));
        assert_eq!(deposit.credit(limits::MAX_BALANCE_CENTS - 9), None);
    }

    #[test]
    fn a_cancellation_refunds_a_capture_only_and_leaves_a_tombstone_before_one() {
        assert_eq!(refund(Some(PaymentStatus::Captured)), Refund::Refund);
        for status in [
            PaymentStatus::Declined,
            PaymentStatus::Refunded,
            PaymentStatus::Cancelled,
        ] {
            assert_eq!(refund(Some(status)), Refund::Nothing);
        }
        assert_eq!(refund(None), Refund::Tombstone);
        let nobody = UserId::from(uuid::Uuid::nil());
        assert!(refunded(nobody, i64::MAX - 1, 2).is_err());
        assert_eq!(refunded(nobody, 1, 2), Ok(3));
    }

    /// Whichever of the call's answer and the webhook comes first settles
    /// the payment; the other finds it settled. A capture for an order
    /// cancelled meanwhile is to be refunded, not confirmed.
    #[test]
    fn a_provider_outcome_settles_a_pending_payment_once() {
        use PaymentStatus::*;
        let declined = || Charged::Declined("card_declined".into());
        assert_eq!(settle(Pending, false, Charged::Succeeded), Settle::Capture);
        assert_eq!(
            settle(Pending, true, Charged::Succeeded),
            Settle::CaptureToRefund
        );
        assert_eq!(
            settle(Pending, true, declined()),
            Settle::Decline("card_declined".into())
        );
        for status in [Captured, Declined, Refunded, Refunding, Cancelled] {
            assert_eq!(settle(status, false, Charged::Succeeded), Settle::Nothing);
            assert_eq!(settle(status, true, declined()), Settle::Nothing);
        }
        assert_eq!(cancel_at_provider(None), ProviderCancel::Tombstone);
        assert_eq!(
            cancel_at_provider(Some(Pending)),
            ProviderCancel::RefundIfCaptured
        );
        assert_eq!(cancel_at_provider(Some(Captured)), ProviderCancel::Refund);
        for status in [Declined, Refunded, Refunding, Cancelled] {
            assert_eq!(cancel_at_provider(Some(status)), ProviderCancel::Nothing);
        }
        // The wallet's compensation never meets a provider's states.
        assert_eq!(refund(Some(Pending)), Refund::Nothing);
    }

    proptest! {
        /// Charged together or one call each, the same charges decide the
        /// same, no balance goes below zero, and what left the wallets is
        /// what was captured.
        #[test]
        fn charges_in_one_call_decide_as_one_at_a_time(
            start in prop::collection::vec(0i64..200, 1..4),
            picks in prop::collection::vec((0usize..4, 0i64..150, 0usize..6), 0..12),
        ) {
            let users: Vec<UserId> = (0..start.len()).map(|_| uuid::Uuid::now_v7().into()).collect();
            let orders: Vec<OrderId> = (0..6).map(|_| uuid::Uuid::now_v7().into()).collect();
            let charges: Vec<Charge> = picks
                .iter()
                .map(|&(user, amount_cents, order)| Charge {
                    order_id: orders[order],
                    user_id: users[user % users.len()],
                    amount_cents,
                })
                .collect();
            let wallets = || users.iter().copied().zip(start.iter().copied()).collect::<HashMap<_, _>>();
            let (mut together, mut decided) = (wallets(), HashSet::new());
            let debits = debit_in_turn(&charges, &mut decided, &mut together).unwrap();
            let (mut apart, mut decided) = (wallets(), HashSet::new());
            let one_by_one: Vec<Debit> = charges
                .iter()
                .flat_map(|charge| debit_in_turn(std::slice::from_ref(charge), &mut decided, &mut apart).unwrap())
                .collect();
            prop_assert_eq!(&debits, &one_by_one);
            prop_assert_eq!(&together, &apart);
            let captured: i64 = charges
                .iter()
                .zip(&debits)
                .filter(|(_, debit)| **debit == Debit::Captured)
                .map(|(charge, _)| charge.amount_cents)
                .sum();
            prop_assert_eq!(start.iter().sum::<i64>() - together.values().sum::<i64>(), captured);
            prop_assert!(together.values().all(|balance| *balance >= 0));
        }
    }
}
