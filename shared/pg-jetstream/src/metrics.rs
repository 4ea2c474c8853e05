//! The messaging runtime's Prometheus metrics. One [`MessagingMetrics`] per
//! service, shared by its relay and consumers and registered in the
//! service's registry; the default is a set that nobody scrapes (tests).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

/// Labels of a published event.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubjectLabels {
    /// Its subject, e.g. `ticket.booked`.
    pub subject: String,
}

/// Labels of a consumed event.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumedLabels {
    /// The durable consumer, e.g. `billing`.
    pub consumer: String,
    /// The subject it arrived on.
    pub subject: String,
    /// `ok`, `duplicate`, `ignored`, `retried` or `dead_lettered`.
    pub outcome: &'static str,
}

/// Labels of a durable consumer's own counts.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabels {
    /// The durable consumer.
    pub consumer: String,
}

/// Labels of a handler's duration.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandlerLabels {
    /// The durable consumer.
    pub consumer: String,
    /// The subject.
    pub subject: String,
}

/// Buckets from 1 ms to about 16 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Counters, histograms and gauges of the relay and the consumers.
#[derive(Debug, Clone)]
pub struct MessagingMetrics {
    /// Events published, by their writers or the sweep, by subject.
    pub published: Family<SubjectLabels, Counter>,
    /// Events the outbox sweep published because no writer confirmed them.
    pub outbox_swept: Counter,
    /// Events the consumers settled, by consumer, subject and outcome.
    pub consumed: Family<ConsumedLabels, Counter>,
    /// How long handling took, from the batch's start to its commit.
    pub handling: Family<HandlerLabels, Histogram>,
    /// Batches tried again in place (database unreachable, deadlock), by
    /// consumer.
    pub batches_tried_again: Family<ConsumerLabels, Counter>,
    /// One-statement writes refused because what their handler read had
    /// changed meanwhile (another writer on the same rows), by consumer:
    /// each is read and decided again. Many, steadily, mean a hot row.
    pub stale_retries: Family<ConsumerLabels, Counter>,
    /// Outbox rows not yet deleted: unconfirmed, or confirmed a moment ago.
    pub outbox_pending: Gauge,
    /// Age of the oldest outbox row, in seconds.
    pub outbox_lag: Gauge<f64, AtomicU64>,
    /// Messages in the `DLQ` stream, neither replayed nor purged.
    pub dead_letters_stored: Gauge,
    /// 1 while the service's NATS connection is up, 0 while it is not.
    pub nats_connected: Gauge,
    /// By consumer: 1 while its pulls work, 0 from its second failed pull
    /// in a row until it receives or is provisioned again.
    pub consumer_up: Family<ConsumerLabels, Gauge>,
    /// By consumer: messages not yet delivered or not yet acked, as
    /// JetStream counts them (sampled on scrapes).
    pub consumer_pending: Family<ConsumerLabels, Gauge>,
}

impl Default for MessagingMetrics {
    fn default() -> Self {
        Self {
            published: Family::default(),
            outbox_swept: Counter::default(),
            consumed: Family::default(),
            handling: Family::new_with_constructor(latency_histogram),
            batches_tried_again: Family::default(),
            stale_retries: Family::default(),
            outbox_pending: Gauge::default(),
            outbox_lag: Gauge::default(),
            dead_letters_stored: Gauge::default(),
            nats_connected: Gauge::default(),
            consumer_up: Family::default(),
            consumer_pending: Family::default(),
        }
    }
}

impl MessagingMetrics {
    /// Registers every metric in `registry`: `events_published`,
    /// `outbox_lag` and so on. Give it a registry with your prefix to name
    /// them after your system:
    ///
    /// ```
    /// let mut registry = prometheus_client::registry::Registry::default();
    /// pg_jetstream::telemetry::MessagingMetrics::default()
    ///     .register(registry.sub_registry_with_prefix("travel"));
    /// // travel_events_published, travel_outbox_lag, ...
    /// ```
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "events_published",
            "Events published to JetStream, by their writers or the outbox sweep",
            self.published.clone(),
        );
        registry.register(
            "outbox_swept",
            "Events the outbox sweep published because their writer did not confirm them (a crash, NATS down)",
            self.outbox_swept.clone(),
        );
        registry.register(
            "events_consumed",
            "Events settled by the consumers, by outcome (ok, duplicate, ignored, retried, dead_lettered)",
            self.consumed.clone(),
        );
        registry.register_with_unit(
            "event_handling",
            "Time from the start of an event's batch to its commit",
            Unit::Seconds,
            self.handling.clone(),
        );
        registry.register(
            "consumer_batches_tried_again",
            "Batches tried again in place after a failure that was not their messages' (database unreachable, deadlock)",
            self.batches_tried_again.clone(),
        );
        registry.register(
            "consumer_stale_retries",
            "One-statement writes refused because what they read had changed meanwhile (another writer on the same rows), read and decided again",
            self.stale_retries.clone(),
        );
        registry.register(
            "outbox_pending_rows",
            "Outbox rows not yet deleted: unconfirmed, or confirmed within the last second",
            self.outbox_pending.clone(),
        );
        registry.register_with_unit(
            "outbox_lag",
            "Age of the oldest outbox row (over a few seconds: events wait for the sweep)",
            Unit::Seconds,
            self.outbox_lag.clone(),
        );
        registry.register(
            "dead_letters_stored",
            "Messages in the DLQ stream, neither replayed nor purged",
            self.dead_letters_stored.clone(),
        );
        registry.register(
            "nats_connected",
            "1 while the service's NATS connection is up (events wait in the outbox while it is not)",
            self.nats_connected.clone(),
        );
        registry.register(
            "consumer_up",
            "1 while a durable consumer's pulls work; 0 after repeated pull errors, until it receives or is provisioned again",
            self.consumer_up.clone(),
        );
        registry.register(
            "consumer_pending",
            "Messages a durable consumer has not yet been delivered or not yet acked (JetStream's count)",
            self.consumer_pending.clone(),
        );
    }
}

/// A histogram of durations in seconds, from 1 ms to about 16 s.
pub fn seconds_histogram() -> Histogram {
    latency_histogram()
}
