//! The order service's view of the sagas: how many ended, how, and how long
//! they took from `PlaceOrder` to the end.

use chrono::{DateTime, Utc};
use pg_jetstream::telemetry::seconds_histogram;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// How one saga ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SagaEnd {
    /// `confirmed` or `cancelled`.
    pub(crate) outcome: &'static str,
    /// Why it was cancelled; empty when confirmed.
    pub(crate) reason: String,
    /// When the order was placed.
    pub(crate) placed_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndLabels {
    outcome: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// Sagas ended by outcome and reason, and their durations.
#[derive(Debug, Clone)]
pub(crate) struct SagaMetrics {
    ended: Family<EndLabels, Counter>,
    duration: Family<OutcomeLabels, Histogram>,
}

impl Default for SagaMetrics {
    fn default() -> Self {
        Self {
            ended: Family::default(),
            duration: Family::new_with_constructor(seconds_histogram),
        }
    }
}

/// The kind of a cancellation reason, for a label whose values stay few:
/// the reasons name SKUs and amounts, the kinds do not.
fn reason_kind(reason: &str) -> &'static str {
    const KINDS: [(&str, &str); 7] = [
        ("out of stock", "out of stock"),
        ("insufficient funds", "insufficient funds"),
        ("declined by the payment provider", "declined"),
        ("timeout", "timeout"),
        ("unknown SKU", "unknown sku"),
        ("quantity of", "invalid quantity"),
        ("the price of", "price overflow"),
    ];
    if reason.is_empty() {
        return "";
    }
    KINDS
        .iter()
        .find(|(prefix, _)| reason.starts_with(prefix))
        .map_or("other", |(_, kind)| kind)
}

impl SagaMetrics {
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "shop_sagas_ended",
            "Sagas that ended, by outcome (confirmed, cancelled) and the kind of reason",
            self.ended.clone(),
        );
        registry.register_with_unit(
            "shop_saga_duration",
            "Time from PlaceOrder to the saga's end, by outcome",
            Unit::Seconds,
            self.duration.clone(),
        );
    }

    /// Counts a saga that ended; call it once its end has committed.
    pub(crate) fn ended(&self, end: &SagaEnd) {
        self.ended
            .get_or_create(&EndLabels {
                outcome: end.outcome,
                reason: reason_kind(&end.reason),
            })
            .inc();
        let took = (Utc::now() - end.placed_at).to_std().unwrap_or_default();
        self.duration
            .get_or_create(&OutcomeLabels {
                outcome: end.outcome,
            })
            .observe(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_is_labelled_by_its_kind() {
        assert_eq!(
            reason_kind("out of stock: LAMP has 1 available, 2 wanted"),
            "out of stock"
        );
        assert_eq!(reason_kind("timeout"), "timeout");
        assert_eq!(
            reason_kind("declined by the payment provider: card_declined"),
            "declined"
        );
        assert_eq!(reason_kind("unknown SKU NOPE"), "unknown sku");
        assert_eq!(reason_kind("something new"), "other");
        assert_eq!(reason_kind(""), "");
    }
}
