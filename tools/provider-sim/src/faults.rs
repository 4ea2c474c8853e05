//! The faults a test or an operator injects, and the seeded dice that
//! decide when each strikes: the same seed and the same calls strike the
//! same way.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// What goes wrong, and how often. Rates are probabilities per call (or
/// per webhook); every one is 0 by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added before every API answer.
    pub latency_ms: u64,
    /// A payment declined (`card_declined`) whatever its amount.
    pub decline_rate: f64,
    /// Payments above this amount are declined (`insufficient_funds`).
    pub decline_above_cents: Option<i64>,
    /// A 503 before anything is done: nothing charged, nothing kept under
    /// the idempotency key.
    pub error_rate: f64,
    /// The payment is made (and kept under its key, and its webhook sent),
    /// then the answer is held for `hang_ms`: the caller times out without
    /// knowing the outcome.
    pub timeout_after_charge_rate: f64,
    /// The same for refunds.
    pub refund_timeout_rate: f64,
    /// How long a held answer is held.
    pub hang_ms: u64,
    /// Each webhook waits a random time up to this before it is sent, so
    /// that webhooks come late and out of order.
    pub webhook_delay_ms: u64,
    /// A webhook delivered twice.
    pub webhook_duplicate_rate: f64,
    /// A webhook's first delivery signed with the wrong secret (the
    /// provider retries, signed right, when it is refused).
    pub webhook_bad_signature_rate: f64,
    /// A webhook's first delivery with a timestamp an hour old.
    pub webhook_old_timestamp_rate: f64,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            decline_rate: 0.0,
            decline_above_cents: None,
            error_rate: 0.0,
            timeout_after_charge_rate: 0.0,
            refund_timeout_rate: 0.0,
            hang_ms: 30_000,
            webhook_delay_ms: 0,
            webhook_duplicate_rate: 0.0,
            webhook_bad_signature_rate: 0.0,
            webhook_old_timestamp_rate: 0.0,
        }
    }
}

impl Faults {
    /// Refuses rates outside 0..=1 and waits longer than ten minutes.
    pub fn check(&self) -> Result<(), String> {
        let rates = [
            ("decline_rate", self.decline_rate),
            ("error_rate", self.error_rate),
            ("timeout_after_charge_rate", self.timeout_after_charge_rate),
            ("refund_timeout_rate", self.refund_timeout_rate),
            ("webhook_duplicate_rate", self.webhook_duplicate_rate),
            (
                "webhook_bad_signature_rate",
                self.webhook_bad_signature_rate,
            ),
            (
                "webhook_old_timestamp_rate",
                self.webhook_old_timestamp_rate,
            ),
        ];
        for (name, rate) in rates {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{name} must be 0 to 1, got {rate}"));
            }
        }
        let waits = [
            ("latency_ms", self.latency_ms),
            ("hang_ms", self.hang_ms),
            ("webhook_delay_ms", self.webhook_delay_ms),
        ];
        for (name, ms) in waits {
            if ms > 600_000 {
                return Err(format!("{name} must be at most 600000, got {ms}"));
            }
        }
        Ok(())
    }
}

/// A seeded generator (SplitMix64): reproducible runs without a crate.
#[derive(Debug)]
pub(crate) struct Dice(Mutex<u64>);

impl Dice {
    pub(crate) fn new(seed: u64) -> Self {
        Self(Mutex::new(seed))
    }

    fn next(&self) -> u64 {
        let mut state = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// `true` with probability `rate`.
    pub(crate) fn roll(&self, rate: f64) -> bool {
        // 53 random bits make a uniform float in [0, 1).
        #[allow(clippy::cast_precision_loss)]
        let unit = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        rate > 0.0 && unit < rate
    }

    /// A number in `0..=max`.
    pub(crate) fn up_to(&self, max: u64) -> u64 {
        if max == 0 { 0 } else { self.next() % (max + 1) }
    }
}

#[cfg(test)]
mod tests {
    use super::{Dice, Faults};

    #[test]
    fn rates_outside_zero_to_one_are_refused() {
        let faults = Faults {
            decline_rate: 1.5,
            ..Faults::default()
        };
        assert!(faults.check().unwrap_err().contains("decline_rate"));
        assert!(Faults::default().check().is_ok());
    }

    #[test]
    fn the_dice_strike_about_as_often_as_asked_and_repeat_with_the_seed() {
        let dice = Dice::new(7);
        let hits = (0..10_000).filter(|_| dice.roll(0.25)).count();
        assert!((2_300..2_700).contains(&hits), "{hits}");
        let again = Dice::new(7);
        let first: Vec<bool> = (0..50).map(|_| Dice::new(7).roll(0.5)).collect();
        assert!(first.iter().all(|hit| *hit == first[0]));
        assert_eq!(again.up_to(0), 0);
        assert!((0..100).all(|_| again.up_to(3) <= 3));
        assert!(!Dice::new(1).roll(0.0));
    }
}
