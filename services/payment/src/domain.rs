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

/// Step 3 for several charges, one after another in the order given: each
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

/// What compensation c3 does to an order's payment.
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

/// Compensation c3 for a cancelled order whose payment stands at `status`
/// (none: no row).
pub fn refund(status: Option<PaymentStatus>) -> Refund {
    match status {
        Some(PaymentStatus::Captured) => Refund::Refund,
        Some(PaymentStatus::Declined | PaymentStatus::Refunded | PaymentStatus::Cancelled) => {
            Refund::Nothing
        }
        None => Refund::Tombstone,
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
