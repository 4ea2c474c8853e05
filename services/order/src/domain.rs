//! An order's rules: what a valid order is, and how its saga moves. Pure.

use std::collections::HashSet;

use chrono::{DateTime, Utc};

shop_domain::labels! {
    /// Where an order's saga stands.
    pub enum Status {
        Pending = "PENDING",
        Confirmed = "CONFIRMED",
        Cancelled = "CANCELLED",
    }
}

/// The reason a timed-out order is cancelled with.
pub const TIMEOUT: &str = "timeout";

/// An order request that passed validation: 1 to 100 lines, each SKU once,
/// quantities 1 to 1000.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderLines(Vec<(String, i32)>);

impl OrderLines {
    pub fn parse(items: &[(String, i32)]) -> Result<Self, String> {
        if items.is_empty() {
            return Err("items must hold at least one line".into());
        }
        if items.len() > 100 {
            return Err(format!(
                "items must hold at most 100 lines, got {}",
                items.len()
            ));
        }
        let mut seen = HashSet::new();
        for (index, (sku, quantity)) in items.iter().enumerate() {
            if sku.trim().is_empty() {
                return Err(format!("items[{index}].sku is required"));
            }
            if sku.contains('\0') {
                return Err(format!(
                    "items[{index}].sku must not contain NUL characters"
                ));
            }
            if sku.chars().count() > 64 {
                return Err(format!("items[{index}].sku must be at most 64 characters"));
            }
            if !(1..=1000).contains(quantity) {
                return Err(format!(
                    "items[{index}].quantity must be 1 to 1000, got {quantity}"
                ));
            }
            if !seen.insert(sku.as_str()) {
                return Err(format!(
                    "items[{index}].sku {sku} is listed twice; put the quantities on one line"
                ));
            }
        }
        Ok(Self(items.to_vec()))
    }

    pub fn lines(&self) -> &[(String, i32)] {
        &self.0
    }
}

/// What the saga's next event does to an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Payment captured in time: confirm.
    Confirm,
    /// Cancel, with this reason.
    Cancel(String),
    /// Record the step; the status stays.
    Record,
}

/// The events the order reacts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SagaEvent {
    Reserved,
    Rejected(String),
    PaymentCompleted,
    PaymentFailed(String),
    /// The deadline sweeper found the order past its deadline.
    DeadlinePassed,
}

/// The order's state machine. Only a PENDING order changes; a capture that
/// arrives after the deadline cancels the order (it is refunded when the
/// payment service sees the cancellation) rather than confirm it late.
pub fn decide(
    status: Status,
    deadline: DateTime<Utc>,
    now: DateTime<Utc>,
    event: &SagaEvent,
) -> Decision {
    if status != Status::Pending {
        return Decision::Record;
    }
    match event {
        SagaEvent::Reserved => Decision::Record,
        SagaEvent::PaymentCompleted if now > deadline => Decision::Cancel(TIMEOUT.into()),
        SagaEvent::PaymentCompleted => Decision::Confirm,
        SagaEvent::DeadlinePassed if now > deadline => Decision::Cancel(TIMEOUT.into()),
        SagaEvent::DeadlinePassed => Decision::Record,
        SagaEvent::Rejected(reason) | SagaEvent::PaymentFailed(reason) => {
            Decision::Cancel(reason.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;

    #[test]
    fn order_lines_are_validated_with_reasons() {
        assert!(OrderLines::parse(&[("LAMP".into(), 1)]).is_ok());
        assert_eq!(
            OrderLines::parse(&[]).unwrap_err(),
            "items must hold at least one line"
        );
        assert!(
            OrderLines::parse(&vec![("A".into(), 1); 101])
                .unwrap_err()
                .contains("at most 100")
        );
        assert_eq!(
            OrderLines::parse(&[(" ".into(), 1)]).unwrap_err(),
            "items[0].sku is required"
        );
        assert!(
            OrderLines::parse(&[("A".into(), 0)])
                .unwrap_err()
                .contains("1 to 1000")
        );
        assert!(
            OrderLines::parse(&[("A".into(), 1001)])
                .unwrap_err()
                .contains("1 to 1000")
        );
        assert!(
            OrderLines::parse(&[("A".into(), 1), ("A".into(), 2)])
                .unwrap_err()
                .contains("listed twice")
        );
    }

    #[test]
    fn only_a_pending_order_moves() {
        let now = Utc::now();
        let later = now + Duration::seconds(30);
        assert_eq!(
            decide(Status::Pending, later, now, &SagaEvent::PaymentCompleted),
            Decision::Confirm
        );
        assert_eq!(
            decide(Status::Pending, later, now, &SagaEvent::Reserved),
            Decision::Record
        );
        assert_eq!(
            decide(
                Status::Pending,
                later,
                now,
                &SagaEvent::Rejected("unknown SKU X".into())
            ),
            Decision::Cancel("unknown SKU X".into())
        );
        for status in [Status::Confirmed, Status::Cancelled] {
            for event in [
                SagaEvent::PaymentCompleted,
                SagaEvent::PaymentFailed("x".into()),
            ] {
                assert_eq!(decide(status, later, now, &event), Decision::Record);
            }
        }
    }

    #[test]
    fn a_capture_after_the_deadline_cancels() {
        let now = Utc::now();
        assert_eq!(
            decide(
                Status::Pending,
                now - Duration::seconds(1),
                now,
                &SagaEvent::PaymentCompleted
            ),
            Decision::Cancel(TIMEOUT.into())
        );
        assert_eq!(
            decide(
                Status::Pending,
                now - Duration::seconds(1),
                now,
                &SagaEvent::DeadlinePassed
            ),
            Decision::Cancel(TIMEOUT.into())
        );
        assert_eq!(
            decide(Status::Pending, now, now, &SagaEvent::DeadlinePassed),
            Decision::Record
        );
        assert_eq!(
            decide(
                Status::Confirmed,
                now - Duration::seconds(1),
                now,
                &SagaEvent::DeadlinePassed
            ),
            Decision::Record
        );
    }
}
