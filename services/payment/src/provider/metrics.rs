//! What the provider's steps export: calls by outcome and how long they
//! took, webhooks taken and refused, and the payments not settled yet with
//! the age of the oldest.

use std::sync::atomic::AtomicU64;

use pg_jetstream::telemetry::seconds_histogram;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    /// `charge` or `refund`.
    call: &'static str,
    /// `done`, `refused` or `unknown`.
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallKind {
    call: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    /// `pending` (the charge's outcome not known) or `refunding`.
    state: &'static str,
}

/// The provider's metrics; registered whether or not a provider is used,
/// so that dashboards and alerts find them everywhere.
#[derive(Debug, Clone)]
pub(crate) struct ProviderMetrics {
    calls: Family<CallLabels, Counter>,
    duration: Family<CallKind, Histogram>,
    webhooks_taken: Counter,
    webhooks_refused: Family<ReasonLabels, Counter>,
    unsettled: Family<StateLabels, Gauge>,
    age: Family<StateLabels, Gauge<f64, AtomicU64>>,
}

impl Default for ProviderMetrics {
    fn default() -> Self {
        let metrics = Self {
            calls: Family::default(),
            duration: Family::new_with_constructor(seconds_histogram),
            webhooks_taken: Counter::default(),
            webhooks_refused: Family::default(),
            unsettled: Family::default(),
            age: Family::default(),
        };
        // Every series there can be, at zero: a family with none is not
        // exported at all, and rates over it would find nothing.
        for state in ["pending", "refunding"] {
            metrics.set_unsettled(state, 0, 0.0);
        }
        for call in ["charge", "refund"] {
            for outcome in ["done", "refused", "unknown"] {
                drop(metrics.calls.get_or_create(&CallLabels { call, outcome }));
            }
            drop(metrics.duration.get_or_create(&CallKind { call }));
        }
        for reason in ["unsigned", "bad_signature", "stale"] {
            drop(
                metrics
                    .webhooks_refused
                    .get_or_create(&ReasonLabels { reason }),
            );
        }
        metrics
    }
}

impl ProviderMetrics {
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "shop_provider_calls",
            "Calls to the payment provider, by call (charge, refund) and outcome (done, refused, unknown)",
            self.calls.clone(),
        );
        registry.register_with_unit(
            "shop_provider_call_duration",
            "How long calls to the payment provider took, by call",
            Unit::Seconds,
            self.duration.clone(),
        );
        registry.register(
            "shop_provider_webhooks_taken",
            "Webhooks from the payment provider verified and taken (duplicates included)",
            self.webhooks_taken.clone(),
        );
        registry.register(
            "shop_provider_webhooks_refused",
            "Webhooks refused, by reason (unsigned, bad_signature, stale)",
            self.webhooks_refused.clone(),
        );
        registry.register(
            "shop_provider_unsettled",
            "Provider payments not settled: pending (the charge's outcome not known) and refunding",
            self.unsettled.clone(),
        );
        registry.register_with_unit(
            "shop_provider_unsettled_age",
            "Age of the oldest provider payment not settled, by state",
            Unit::Seconds,
            self.age.clone(),
        );
    }

    pub(crate) fn call(&self, call: &'static str, outcome: &'static str, seconds: f64) {
        self.calls
            .get_or_create(&CallLabels { call, outcome })
            .inc();
        self.duration
            .get_or_create(&CallKind { call })
            .observe(seconds);
    }

    pub(crate) fn webhook_taken(&self) {
        self.webhooks_taken.inc();
    }

    pub(crate) fn webhook_refused(&self, reason: &'static str) {
        self.webhooks_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub(crate) fn set_unsettled(&self, state: &'static str, count: i64, age_seconds: f64) {
        self.unsettled
            .get_or_create(&StateLabels { state })
            .set(count);
        self.age
            .get_or_create(&StateLabels { state })
            .set(age_seconds);
    }
}
