//! The idempotent consumer loop.
//!
//! A map of the folder:
//! - this file: [`EventConsumer`] and its settings, [`RetryPolicy`], the
//!   counters and the hook;
//! - `handler`: what a handler sees ([`Context`], [`Batch`], [`Statement`])
//!   and how it fails ([`HandlerError`]);
//! - `router`: the table from `ce-type` to handler ([`Router`]) and what a
//!   consumer makes of a message before any handler runs;
//! - `fetch`: the pull loop, batches of what has arrived, leases (progress
//!   acks) and what goes back on shutdown;
//! - `batch`: one batch: its routes in one statement (`statement`), the
//!   others in one transaction, fast path then careful path, trying again
//!   in place;
//! - `statement`: routes in one statement: a stale read decided again, a
//!   redelivery refused by the inbox, a failure settled alone;
//! - `locks`: the advisory locks a batch takes, in one order;
//! - `attempts`: failed attempts counted per event, and messages delivered
//!   too often set aside;
//! - `failure`: telling failures apart: retry in place, retryable, permanent;
//! - `settle`: ack, nak with backoff, or dead-letter.
//!
//! Messages are handled in batches of whatever has already arrived, one
//! transaction per batch. Per message: parse the envelope and decode the body
//! (a message that cannot be decoded goes to the dead-letter queue at once);
//! insert (consumer, event id) into the inbox (already there: a redelivery,
//! acked without effect); run the handler, which may emit events into the
//! outbox. The batch commits; the events it emitted are published (and, for
//! a redelivery, any its first delivery emitted that are still unconfirmed);
//! only then is each message acked, so that an acked message's events are
//! in JetStream. A batch whose events could not be published acks nothing:
//! its redelivery publishes them. A batch route ([`Route::batched`]) takes
//! all of a batch's new events of its type in one call, so that a batch
//! costs a few statements rather than a few per event. The fast path takes
//! the batch's locks and writes its inbox rows in one statement and uses
//! no savepoints; if any handler fails, the batch is rolled back and redone
//! with a savepoint per message (a batch route's handler called with one
//! event at a time), so that a failure undoes only its own message (a batch
//! of one needs no redo: its rollback was the message's). Handlers must therefore
//! keep their effects inside the transaction they are given.
//!
//! A route in one statement ([`Route::in_one_statement`]) takes no part in
//! the transaction: its handler reads without locks, decides, and writes
//! once, in a statement that commits by itself and carries the events'
//! inbox rows and what they emitted ([`Statement::carry`]), or raises a
//! serialization failure when what it read has changed; the events are then
//! read and decided again. A batch applies those routes first, each
//! route's events in a statement of its own.
//!
//! A handler fails with a [`HandlerError`]: a retryable failure is retried
//! by a nak with an exponentially growing delay ([`RetryPolicy`]) and
//! dead-lettered on the last allowed failed attempt (only attempts whose
//! handler failed count); a permanent one is dead-lettered at once. A panicking handler counts as a retryable failure
//! and the loop carries on. A dead letter keeps the original body and
//! headers, adds the reason, the consumer, the delivery count and the stream
//! sequence, goes to `dlq.<consumer>.<subject>`, and only then is the
//! original terminated: nothing is lost and nothing blocks the stream.
//!
//! A batch whose transaction fails for a reason that says nothing about its
//! messages — the database unreachable, a deadlock, a serialisation
//! failure, a row lock held elsewhere past the session's lock timeout — is
//! tried again in place for as long as that lasts, its messages kept with
//! progress acks, so that an outage or a stuck peer spends no deliveries.
//! Messages fetched while every batch slot is busy are kept leased the same
//! way until a slot frees. Routes declared
//! [`Route::locking`] name what their handlers lock; a batch takes
//! advisory locks on those names, in one order, before its inbox rows and
//! any handler, so that batches on several replicas queue instead of
//! deadlocking.
//!
//! Event types without a route are acked and counted, not dead-lettered: an
//! older consumer ignores the event types a newer producer adds.

mod attempts;
mod batch;
mod failure;
mod fetch;
mod handler;
mod locks;
mod router;
mod settle;
mod statement;

pub use handler::{Batch, Carried, Context, HandlerError, Statement, uuid_field};
pub use router::{
    BatchHandler, Handler, InOneStatement, InTransaction, LockNames, Route, RouteKind, Router,
    StatementHandler,
};
pub use settle::dead_letter_headers;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crate::db::PgPool;
use async_nats::jetstream;

use crate::metrics::MessagingMetrics;
use crate::outbox::Outbox;
use crate::provision::{ConsumerSpec, Names};

/// Delays between deliveries of a message whose handler failed, retryably:
/// `initial`, then multiplied by `multiplier` per failure up to `max`; the
/// `max_deliver`-th failed attempt is dead-lettered.
///
/// Only attempts whose handler failed count (kept per event in the
/// `consumer_failures` table): a delivery that ended otherwise — a nak at
/// shutdown, a process that stopped or died with the message in hand, a
/// batch kept while the database was away — spends nothing, so a rolling
/// deploy during an outage dead-letters no event. A message delivered more
/// than `max_deliveries` times that is still not applied is dead-lettered
/// without running its handler again: its handling may be what stops the
/// process. One already applied is acked, never dead-lettered.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// The delay after the first failure.
    pub initial: Duration,
    /// The factor between successive delays.
    pub multiplier: u32,
    /// The longest delay.
    pub max: Duration,
    /// The most attempts of one message whose handler failed.
    pub max_deliver: i64,
    /// The most deliveries of one message not yet applied, however each
    /// ended, before it is dead-lettered without another attempt.
    pub max_deliveries: i64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            multiplier: 2,
            max: Duration::from_secs(30),
            max_deliver: 8,
            max_deliveries: 64,
        }
    }
}

impl RetryPolicy {
    /// The delay before the next attempt, after the `failures`-th attempt
    /// (counted from 1) failed.
    pub fn delay(&self, failures: i64) -> Duration {
        let exponent = u32::try_from(failures.saturating_sub(1))
            .unwrap_or(u32::MAX)
            .min(30);
        let factor = self.multiplier.saturating_pow(exponent);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

/// Counters of what the consumer did, by outcome.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    /// Events whose handler committed.
    pub applied: AtomicU64,
    /// Redeliveries of events already applied, acked without effect.
    pub duplicates: AtomicU64,
    /// Events of a type without a route, acked.
    pub ignored: AtomicU64,
    /// Failed deliveries nak'ed for a retry.
    pub retried: AtomicU64,
    /// Messages moved to the dead-letter queue.
    pub dead_lettered: AtomicU64,
    /// Batches tried again in place after a failure that said nothing about
    /// their messages (the database unreachable, a deadlock).
    pub batches_tried_again: AtomicU64,
    /// One-statement writes refused because what their handler read had
    /// changed meanwhile, each read and decided again.
    pub stale_retries: AtomicU64,
}

/// How one delivery ended, as reported to a [`ProcessedHook`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Processed {
    /// The handler's transaction committed.
    Applied,
    /// A redelivery of an event already applied.
    Duplicate,
    /// An event type without a route.
    Ignored,
    /// The handler failed; the message was nak'ed for a later delivery.
    Retried,
    /// The message went to the dead-letter queue.
    DeadLettered,
}

/// Called after each delivery is settled in the database and before it is
/// acknowledged, with how long the delivery took to process: for metrics and
/// benchmarks.
pub type ProcessedHook = Arc<dyn Fn(&jetstream::Message, Processed, Duration) + Send + Sync>;

/// A durable consumer that applies each event once, in its own transaction.
pub struct EventConsumer<S> {
    inner: Arc<Inner<S>>,
    spec: ConsumerSpec,
    concurrency: usize,
    batch_size: usize,
    inbox_retention: Duration,
}

impl<S> std::fmt::Debug for EventConsumer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventConsumer")
            .field("spec", &self.spec)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

struct Inner<S> {
    name: String,
    js: jetstream::Context,
    pool: PgPool,
    outbox: Outbox,
    router: Router<S>,
    state: S,
    retry: RetryPolicy,
    stats: Arc<ConsumerStats>,
    hook: Option<ProcessedHook>,
    metrics: MessagingMetrics,
    /// How long JetStream waits for an ack before it delivers again.
    ack_wait: Duration,
    /// Where dead letters go and replays come from.
    names: Names,
}

impl<S: Send + Sync + 'static> EventConsumer<S> {
    /// A consumer for `spec` that routes events through `router` to
    /// `state`'s handlers, and writes the events they emit to `outbox`
    /// (`state` may be an `Arc` of a handler, shared with whoever wants to
    /// look at it). The spec's filter subjects are set from the router when
    /// left empty.
    pub fn new(
        js: jetstream::Context,
        pool: PgPool,
        outbox: Outbox,
        mut spec: ConsumerSpec,
        router: Router<S>,
        state: S,
    ) -> Self {
        if spec.filter_subjects.is_empty() {
            spec.filter_subjects = router.subjects().iter().map(|s| (*s).to_owned()).collect();
        }
        let inner = Inner {
            name: spec.durable_name.clone(),
            js,
            pool,
            outbox,
            router,
            state,
            retry: RetryPolicy::default(),
            stats: Arc::default(),
            hook: None,
            metrics: MessagingMetrics::default(),
            // With a backoff, the server waits its first step.
            ack_wait: <[Duration]>::first(&spec.ack_backoff)
                .copied()
                .unwrap_or(spec.ack_wait),
            names: Names::default(),
        };
        Self {
            inner: Arc::new(inner),
            spec,
            concurrency: 1,
            batch_size: 64,
            inbox_retention: Duration::from_secs(14 * 24 * 3600),
        }
    }

    /// Sets the retry policy.
    #[must_use]
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.inner_mut().retry = retry;
        self
    }

    /// Sets how many batches are handled at once, each on a connection of
    /// its own (at least 1; default 1). One batch at a time makes the next
    /// batch take everything that arrived meanwhile, so batches grow with
    /// the load; batches side by side split the same messages into smaller
    /// ones, each paying a transaction, and queue on the same locks when
    /// events touch the same rows (one popular product). More than one
    /// helps when handlers wait on something other than this database.
    #[must_use]
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Sets the most messages handled in one transaction (at least 1;
    /// default 64). A batch takes only what has already arrived, so a quiet
    /// stream is handled one message at a time, without waiting.
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// Sets how long inbox rows are kept; keep it longer than the stream
    /// keeps messages, or an old redelivery could be applied again.
    #[must_use]
    pub fn with_inbox_retention(mut self, retention: Duration) -> Self {
        self.inbox_retention = retention;
        self
    }

    /// Sets where dead letters go and replays come from (default:
    /// [`Names::default`]); the same as every service's of the system.
    #[must_use]
    pub fn with_names(mut self, names: Names) -> Self {
        self.inner_mut().names = names;
        self
    }

    /// Calls `hook` for every settled delivery.
    #[must_use]
    pub fn with_hook(mut self, hook: ProcessedHook) -> Self {
        self.inner_mut().hook = Some(hook);
        self
    }

    /// Counts into `metrics` (the service's registered set).
    #[must_use]
    pub fn with_metrics(mut self, metrics: MessagingMetrics) -> Self {
        self.inner_mut().metrics = metrics;
        self
    }

    /// The consumer's counters.
    pub fn stats(&self) -> Arc<ConsumerStats> {
        Arc::clone(&self.inner.stats)
    }

    fn inner_mut(&mut self) -> &mut Inner<S> {
        Arc::get_mut(&mut self.inner).expect("configured before it runs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_exponentially_up_to_the_cap() {
        let policy = RetryPolicy {
            initial: Duration::from_millis(100),
            multiplier: 2,
            max: Duration::from_millis(700),
            max_deliver: 10,
            max_deliveries: 64,
        };
        let delays: Vec<_> = (1..=5)
            .map(|failures| policy.delay(failures).as_millis())
            .collect();
        assert_eq!(delays, [100, 200, 400, 700, 700]);
        assert_eq!(policy.delay(i64::MAX), Duration::from_millis(700));
    }
}
