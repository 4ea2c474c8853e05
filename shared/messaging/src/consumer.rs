//! The idempotent consumer loop.
//!
//! Messages are handled in batches of whatever has already arrived, one
//! transaction per batch. Per message: parse the envelope and decode the body
//! (a message that cannot be decoded goes to the dead-letter queue at once);
//! insert (consumer, event id) into the inbox (already there: a redelivery,
//! acked without effect); run the handler, which may emit events into the
//! outbox. The batch commits, then each message is acked. A batch route
//! ([`Router::on_batch`]) takes all of a batch's new events of its type in
//! one call, so that a batch costs a few statements rather than a few per
//! event. The fast path inserts the batch's inbox rows in one statement and
//! uses no savepoints; if any handler fails, the batch is rolled back and
//! redone with a savepoint per message (a batch route's handler called with
//! one event at a time), so that a failure undoes only its own message (a
//! batch of one needs no redo: its rollback was the message's). Handlers
//! must therefore keep their effects inside the transaction they are given.
//!
//! A handler fails with a [`HandlerError`]: a transient failure is retried
//! by a nak with an exponentially growing delay ([`RetryPolicy`]) and
//! dead-lettered on the last allowed delivery; a permanent one is
//! dead-lettered at once. A panicking handler counts as a transient failure
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
//! way until a slot frees. Routes added with
//! [`Router::on_locking`] name what their handlers lock; a batch takes
//! advisory locks on those names, in one order, before any handler runs, so
//! that batches on several replicas queue instead of deadlocking.
//!
//! Event types without a route are acked and counted, not dead-lettered: an
//! older consumer ignores the event types a newer producer adds.

use std::any::Any;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, message::PublishMessage};
use diesel::prelude::*;
use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl};
use futures::{FutureExt as _, StreamExt as _};
use shop_db::{Cached, PgPool};
use shop_proto::Event;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::BoxFuture;
use crate::envelope::{Envelope, OutgoingEvent};
use crate::metrics::{ConsumedLabels, ConsumerLabels, HandlerLabels, MessagingMetrics};
use crate::outbox::Outbox;
use crate::provision::{ConsumerSpec, original_subject};
use crate::schema::inbox;
use crate::trace;

/// Headers a dead letter adds to the original's.
pub mod dead_letter_headers {
    /// Why the message was dead-lettered.
    pub const REASON: &str = "dlq-reason";
    /// The durable consumer that gave up on it.
    pub const CONSUMER: &str = "dlq-consumer";
    /// How many times it had been delivered.
    pub const DELIVERIES: &str = "dlq-delivery-count";
    /// The stream it came from.
    pub const STREAM: &str = "dlq-stream";
    /// Its sequence in that stream.
    pub const STREAM_SEQUENCE: &str = "dlq-stream-sequence";
    /// The subject it was published on.
    pub const SUBJECT: &str = "dlq-subject";
}

/// How a handler failed.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth retrying: the database or a dependency was unavailable, a
    /// serialisation conflict, ... Retried with backoff, then dead-lettered.
    #[error("transient: {0}")]
    Transient(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Never going to succeed for this message: it is dead-lettered at once.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl HandlerError {
    /// A failure worth retrying.
    pub fn transient(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Transient(error.into())
    }

    /// A failure that retrying cannot fix, with a reason for people.
    pub fn permanent(reason: impl Into<String>) -> Self {
        Self::Permanent(reason.into())
    }
}

/// Parses an event's UUID field; a malformed one is a permanent failure.
pub fn uuid_field(field: &str, value: &str) -> Result<uuid::Uuid, HandlerError> {
    uuid::Uuid::parse_str(value)
        .map_err(|_| HandlerError::permanent(format!("{field} is not a UUID: {value:?}")))
}

impl From<diesel::result::Error> for HandlerError {
    fn from(error: diesel::result::Error) -> Self {
        Self::transient(error)
    }
}

/// What a handler works with: the transaction's connection, the envelope of
/// the event being handled, and the events it emits, which are written to
/// the outbox in the same transaction after the handler returns.
pub struct Context<'c> {
    conn: &'c mut AsyncPgConnection,
    envelope: &'c Envelope,
    emitted: Vec<OutgoingEvent>,
    after_commit: Vec<AfterCommit>,
}

/// Work that must happen only once the handler's transaction committed.
type AfterCommit = Box<dyn FnOnce() + Send>;

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("envelope", self.envelope)
            .field("emitted", &self.emitted)
            .finish()
    }
}

impl Context<'_> {
    /// The connection of the handler's transaction.
    pub fn conn(&mut self) -> &mut AsyncPgConnection {
        self.conn
    }

    /// The event being handled.
    pub fn envelope(&self) -> &Envelope {
        self.envelope
    }

    /// Runs `work` once the transaction that applies this event has
    /// committed, and never if it rolls back (a handler may run more than
    /// once before its effects commit): for counting what happened.
    pub fn after_commit(&mut self, work: impl FnOnce() + Send + 'static) {
        self.after_commit.push(Box::new(work));
    }

    /// Emits `event`, correlated like the event being handled and caused by
    /// it; it is published only if the transaction commits.
    pub fn emit<E: Event>(&mut self, event: &E) {
        let mut outgoing = OutgoingEvent::new(event).caused_by(self.envelope.id);
        outgoing.correlation_id = self.envelope.correlation_id.clone();
        self.emitted.push(outgoing);
    }
}

/// What a batch handler (see [`Router::on_batch`]) works with: the
/// transaction's connection and the envelopes of the events it handles,
/// indexed like the events it is given.
pub struct Batch<'c> {
    conn: &'c mut AsyncPgConnection,
    envelopes: Vec<&'c Envelope>,
    emitted: Vec<Vec<OutgoingEvent>>,
    after_commit: Vec<AfterCommit>,
}

impl std::fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("envelopes", &self.envelopes)
            .field("emitted", &self.emitted)
            .finish()
    }
}

impl Batch<'_> {
    /// The connection of the batch's transaction.
    pub fn conn(&mut self) -> &mut AsyncPgConnection {
        self.conn
    }

    /// The envelope of the `index`-th event.
    ///
    /// # Panics
    /// If there is no such event.
    pub fn envelope(&self, index: usize) -> &Envelope {
        self.envelopes[index]
    }

    /// Runs `work` once the batch's transaction has committed (see
    /// [`Context::after_commit`]).
    pub fn after_commit(&mut self, work: impl FnOnce() + Send + 'static) {
        self.after_commit.push(Box::new(work));
    }

    /// Emits `event` as caused by the `index`-th event (correlated like it,
    /// and traced in its saga); published only if the transaction commits.
    ///
    /// # Panics
    /// If there is no such event.
    pub fn emit<E: Event>(&mut self, index: usize, event: &E) {
        let cause = self.envelopes[index];
        let mut outgoing = OutgoingEvent::new(event).caused_by(cause.id);
        outgoing.correlation_id = cause.correlation_id.clone();
        self.emitted[index].push(outgoing);
    }
}

type Decoded = Box<dyn Any + Send + Sync>;
type HandleOne<S> = Box<
    dyn for<'a, 'c> Fn(
            &'a S,
            &'a mut Context<'c>,
            Decoded,
        ) -> BoxFuture<'a, Result<(), HandlerError>>
        + Send
        + Sync,
>;
type HandleBatch<S> = Box<
    dyn for<'a, 'c> Fn(
            &'a S,
            &'a mut Batch<'c>,
            Vec<Decoded>,
        ) -> BoxFuture<'a, Result<(), HandlerError>>
        + Send
        + Sync,
>;

/// A route's handler: for one event at a time, or for all of a batch's
/// events of its type at once.
enum Handle<S> {
    One(HandleOne<S>),
    Batch(HandleBatch<S>),
}

/// What a route's handler will lock for the batch's events of its type,
/// named from the events (looked up in the batch's transaction when the
/// events alone do not say).
type Locks = Box<
    dyn for<'a> Fn(
            &'a mut AsyncPgConnection,
            Vec<&'a (dyn Any + Send + Sync)>,
        ) -> BoxFuture<'a, QueryResult<Vec<String>>>
        + Send
        + Sync,
>;

/// The failure of a handler given another type than its route decodes;
/// cannot happen, since the route's `decode` is the only producer.
fn wrong_type<'a>() -> BoxFuture<'a, Result<(), HandlerError>> {
    Box::pin(async { Err(HandlerError::permanent("internal: decoded the wrong type")) })
}

struct Route<S> {
    /// The one subject events of this type are published on.
    subject: &'static str,
    decode: fn(&[u8]) -> Result<Decoded, prost::DecodeError>,
    handle: Handle<S>,
    locks: Option<Locks>,
}

/// The routing table from `ce-type` to handler: the whole of a service's
/// event adapter.
///
/// Handlers are functions of the shape
/// `fn on_x<'a>(state: &'a S, cx: &'a mut Context<'_>, event: X) -> BoxFuture<'a, Result<(), HandlerError>>`.
pub struct Router<S> {
    routes: HashMap<&'static str, Route<S>>,
    subjects: Vec<&'static str>,
}

impl<S> std::fmt::Debug for Router<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("subjects", &self.subjects)
            .finish()
    }
}

impl<S> Default for Router<S> {
    fn default() -> Self {
        Self {
            routes: HashMap::new(),
            subjects: Vec::new(),
        }
    }
}

impl<S: Send + Sync + 'static> Router<S> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Routes events of type `E` to `handler`.
    #[must_use]
    pub fn on<E, F>(self, handler: F) -> Self
    where
        E: Event,
        F: for<'a, 'c> Fn(&'a S, &'a mut Context<'c>, E) -> BoxFuture<'a, Result<(), HandlerError>>
            + Send
            + Sync
            + 'static,
    {
        let handle: HandleOne<S> =
            Box::new(move |state, cx, decoded| match decoded.downcast::<E>() {
                Ok(event) => handler(state, cx, *event),
                Err(_) => wrong_type(),
            });
        self.route::<E>(Handle::One(handle))
    }

    /// Routes events of type `E` to `handler`, like [`on`](Self::on), and
    /// names what the handler will lock (`"product:LAMP"`, say). Before any
    /// handler of a batch runs, the batch takes a transaction-level advisory
    /// lock on every name its events give, all in one global order. Batches
    /// that touch the same rows — on this consumer, on another replica or on
    /// another consumer of the same database — then wait for each other
    /// instead of each holding a row the other needs (a deadlock, which
    /// PostgreSQL breaks only after a second). `locks` gets all the batch's
    /// events of type `E` at once, and may query (once, in the batch's
    /// transaction) when the events do not carry the names.
    #[must_use]
    pub fn on_locking<E, L, F>(self, locks: L, handler: F) -> Self
    where
        E: Event,
        L: for<'a> Fn(
                &'a mut AsyncPgConnection,
                Vec<&'a E>,
            ) -> BoxFuture<'a, QueryResult<Vec<String>>>
            + Send
            + Sync
            + 'static,
        F: for<'a, 'c> Fn(&'a S, &'a mut Context<'c>, E) -> BoxFuture<'a, Result<(), HandlerError>>
            + Send
            + Sync
            + 'static,
    {
        self.on::<E, F>(handler).with_locks::<E, L>(locks)
    }

    /// Routes events of type `E` to `handler`, which applies several at
    /// once: all of a batch's new events of type `E`, in the order they
    /// arrived, in one call — a few statements per batch instead of a few
    /// per event.
    ///
    /// The handler must do what handling the events one after another
    /// would do. If it fails, the batch is redone with each event on its
    /// own (the handler called with one event), so that a failure is
    /// settled for the event that caused it. A batch's events of this type
    /// are applied together where the first of them stands, after the
    /// batch's earlier events and before its later ones, whatever their
    /// types: the route's events must not depend on the order in which they
    /// and events of other types apply within a batch (saga steps, which
    /// must bear reordering anyway, do not).
    #[must_use]
    pub fn on_batch<E, F>(self, handler: F) -> Self
    where
        E: Event,
        F: for<'a, 'c> Fn(
                &'a S,
                &'a mut Batch<'c>,
                Vec<E>,
            ) -> BoxFuture<'a, Result<(), HandlerError>>
            + Send
            + Sync
            + 'static,
    {
        let handle: HandleBatch<S> = Box::new(move |state, batch, decoded| {
            let events: Option<Vec<E>> = decoded
                .into_iter()
                .map(|decoded| decoded.downcast::<E>().ok().map(|event| *event))
                .collect();
            match events {
                Some(events) => handler(state, batch, events),
                None => wrong_type(),
            }
        });
        self.route::<E>(Handle::Batch(handle))
    }

    /// Routes events of type `E` to `handler` as [`on_batch`](Self::on_batch)
    /// does, and names what it will lock as [`on_locking`](Self::on_locking)
    /// does.
    #[must_use]
    pub fn on_batch_locking<E, L, F>(self, locks: L, handler: F) -> Self
    where
        E: Event,
        L: for<'a> Fn(
                &'a mut AsyncPgConnection,
                Vec<&'a E>,
            ) -> BoxFuture<'a, QueryResult<Vec<String>>>
            + Send
            + Sync
            + 'static,
        F: for<'a, 'c> Fn(
                &'a S,
                &'a mut Batch<'c>,
                Vec<E>,
            ) -> BoxFuture<'a, Result<(), HandlerError>>
            + Send
            + Sync
            + 'static,
    {
        self.on_batch::<E, F>(handler).with_locks::<E, L>(locks)
    }

    /// Names what the handler of `E`'s route will lock.
    fn with_locks<E, L>(mut self, locks: L) -> Self
    where
        E: Event,
        L: for<'a> Fn(
                &'a mut AsyncPgConnection,
                Vec<&'a E>,
            ) -> BoxFuture<'a, QueryResult<Vec<String>>>
            + Send
            + Sync
            + 'static,
    {
        if let Some(route) = self.routes.get_mut(E::TYPE) {
            route.locks = Some(Box::new(move |conn, decoded| {
                let events = decoded
                    .into_iter()
                    .filter_map(|event| event.downcast_ref::<E>())
                    .collect();
                locks(conn, events)
            }));
        }
        self
    }

    fn route<E: Event>(mut self, handle: Handle<S>) -> Self {
        fn decode<E: Event>(body: &[u8]) -> Result<Decoded, prost::DecodeError> {
            E::decode(body).map(|event| Box::new(event) as Decoded)
        }
        self.routes.insert(
            E::TYPE,
            Route {
                subject: E::SUBJECT,
                decode: decode::<E>,
                handle,
                locks: None,
            },
        );
        if !self.subjects.contains(&E::SUBJECT) {
            self.subjects.push(E::SUBJECT);
        }
        self
    }

    /// This table and `other`'s, for a consumer that receives the events of
    /// both, such as a service's replay durable.
    #[must_use]
    pub fn merge(mut self, other: Self) -> Self {
        self.routes.extend(other.routes);
        for subject in other.subjects {
            if !self.subjects.contains(&subject) {
                self.subjects.push(subject);
            }
        }
        self
    }

    /// The subjects of the routed events, for the consumer's filter.
    pub fn subjects(&self) -> &[&'static str] {
        &self.subjects
    }

    /// What a consumer makes of a message on `subject` before any handler
    /// runs, without a database: `Ok(Some(type))` when a route takes it,
    /// `Ok(None)` when none does (it is acked and ignored), `Err(reason)`
    /// when it is dead-lettered with that reason. For tests and fuzzing.
    pub fn check(
        &self,
        subject: &str,
        headers: Option<&async_nats::HeaderMap>,
        body: bytes::Bytes,
    ) -> Result<Option<String>, String> {
        let envelope =
            Envelope::parse(subject, headers, body).map_err(|error| error.to_string())?;
        Ok(self.admit(&envelope)?.map(|_| envelope.event_type))
    }

    /// The route of a parsed envelope and its decoded event; `Ok(None)`
    /// when no route takes its type; `Err(reason)` when it must be
    /// dead-lettered.
    fn admit(&self, envelope: &Envelope) -> Result<Option<(&Route<S>, Decoded)>, String> {
        let Some(route) = self.routes.get(envelope.event_type.as_str()) else {
            return Ok(None);
        };
        // A type on another type's subject is a producer's bug or a forgery:
        // applying it would let one event do another's work.
        if envelope.subject != route.subject {
            return Err(format!(
                "a {} belongs on {}, not on {}",
                envelope.event_type, route.subject, envelope.subject
            ));
        }
        let decoded = (route.decode)(&envelope.body)
            .map_err(|error| format!("body is not a valid {}: {error}", envelope.event_type))?;
        Ok(Some((route, decoded)))
    }
}

/// Delays between deliveries of a message whose handler failed transiently:
/// `initial`, then multiplied by `multiplier` per failure up to `max`; the
/// `max_deliver`-th failed delivery is dead-lettered.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// The delay after the first failure.
    pub initial: Duration,
    /// The factor between successive delays.
    pub multiplier: u32,
    /// The longest delay.
    pub max: Duration,
    /// The most deliveries of one message, the first included.
    pub max_deliver: i64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            multiplier: 2,
            max: Duration::from_secs(30),
            max_deliver: 8,
        }
    }
}

impl RetryPolicy {
    /// The delay before delivery `delivered + 1`, after delivery `delivered`
    /// (counted from 1) failed.
    pub fn delay(&self, delivered: i64) -> Duration {
        let exponent = u32::try_from(delivered.saturating_sub(1))
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
}

enum Outcome {
    Applied,
    Duplicate,
    Ignored,
}

/// Why a batch's transaction failed as a whole; nothing was applied.
enum BatchFailed {
    /// For reasons that say nothing about the messages (see [`passing`]).
    Passing(String),
    /// Anything else.
    Other(String),
}

impl From<diesel::result::Error> for BatchFailed {
    fn from(error: diesel::result::Error) -> Self {
        let reason = format!("the batch's transaction failed: {error}");
        if passing(&error) {
            Self::Passing(reason)
        } else {
            Self::Other(reason)
        }
    }
}

/// The pause before trying a batch again in place: 50 ms, doubling, at most
/// 5 s.
fn retry_here_delay(attempts: u32) -> Duration {
    Duration::from_millis(50u64 << attempts.saturating_sub(1).min(7)).min(Duration::from_secs(5))
}

/// Whether a database error says nothing about the messages being handled:
/// the database was unreachable or went away, or a concurrent transaction
/// got in the way (a deadlock, a serialisation failure). The same batch may
/// well succeed a moment later.
fn passing(error: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind as Kind, Error};
    match error {
        Error::BrokenTransactionManager => true,
        Error::DatabaseError(
            Kind::ClosedConnection | Kind::UnableToSendCommand | Kind::SerializationFailure,
            _,
        ) => true,
        Error::DatabaseError(Kind::Unknown, info) => {
            let message = info.message();
            message.contains("deadlock detected")
                // Another session holds the rows (see `SessionLimits`).
                || message.contains("lock timeout")
                || message.contains("the database system is")
                || message.contains("connection")
        }
        _ => false,
    }
}

/// The database error inside a handler's failure, when it is [`passing`].
fn into_passing(error: HandlerError) -> Result<diesel::result::Error, HandlerError> {
    match error {
        HandlerError::Transient(source) => match source.downcast::<diesel::result::Error>() {
            Ok(error) if passing(&error) => Ok(*error),
            Ok(error) => Err(HandlerError::Transient(error)),
            Err(source) => Err(HandlerError::Transient(source)),
        },
        permanent @ HandlerError::Permanent(_) => Err(permanent),
    }
}

diesel::define_sql_function! {
    /// Takes an advisory lock on each key, in the order given (see the
    /// messaging migrations).
    fn consumer_lock_keys(keys: diesel::sql_types::Array<diesel::sql_types::BigInt>) -> diesel::sql_types::Integer;
}

/// A stable 64-bit advisory lock key for a lock name (FNV-1a), the same in
/// every process.
fn lock_key(name: &str) -> i64 {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// Why the fast path gave a batch up.
enum Abandoned {
    /// A handler failed (for a reason about its message).
    HandlerFailed(HandlerError),
    Database(diesel::result::Error),
}

impl From<diesel::result::Error> for Abandoned {
    fn from(error: diesel::result::Error) -> Self {
        Self::Database(error)
    }
}

enum Failure {
    Transient(String),
    Permanent(String),
}

impl From<HandlerError> for Failure {
    fn from(error: HandlerError) -> Self {
        match error {
            HandlerError::Transient(source) => Self::Transient(error_chain(&*source)),
            HandlerError::Permanent(reason) => Self::Permanent(reason),
        }
    }
}

impl<S: Send + Sync + 'static> EventConsumer<S> {
    /// A consumer for `spec` that routes events through `router` with
    /// `state`, and writes the events its handlers emit to `outbox`. The
    /// spec's filter subjects are set from the router when left empty.
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

    /// Provisions the durable consumer and handles messages until `shutdown`
    /// is cancelled; then stops fetching, lets the batches in hand finish,
    /// hands the messages fetched but not started back to JetStream (nak),
    /// and returns. A message still on its way from an open pull request is
    /// delivered again after the ack wait.
    pub async fn run(self, shutdown: CancellationToken) {
        // The broker may be down at start-up or mid-way: keep trying.
        let mut failures = 0u32;
        let consumer = loop {
            match self.spec.provision(&self.inner.js).await {
                Ok(consumer) => break consumer,
                Err(error) => {
                    failures += 1;
                    tracing::warn!(consumer = %self.inner.name, error = %error, failures, "cannot provision the consumer; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(reconnect_delay(failures)) => {}
                    }
                }
            }
        };
        let tracker = TaskTracker::new();
        tracker.spawn(prune_inbox(
            Arc::clone(&self.inner),
            self.inbox_retention,
            shutdown.clone(),
        ));
        let permits = Arc::new(Semaphore::new(self.concurrency));
        // Fetched while every batch slot was busy: kept leased (progress
        // acks) until a slot frees, so that a stalled batch does not make
        // the messages behind it age into redeliveries. JetStream's
        // `max_ack_pending` bounds how many there can be.
        let mut held: VecDeque<jetstream::Message> = VecDeque::new();
        let lease_every = (self.inner.ack_wait / 3).max(Duration::from_millis(100));
        failures = 0;
        'fetch: while !shutdown.is_cancelled() {
            let stream = consumer
                .stream()
                .max_messages_per_batch(self.concurrency * self.batch_size)
                // A lost pull (the server restarted) shows as missed
                // heartbeats: frequent ones find it within a few seconds.
                .heartbeat(Duration::from_secs(1))
                .expires(Duration::from_secs(10))
                .messages()
                .await;
            let mut messages = match stream {
                Ok(messages) => messages,
                Err(error) => {
                    failures += 1;
                    tracing::warn!(consumer = %self.inner.name, error = %error, "cannot pull messages; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(reconnect_delay(failures)) => continue,
                    }
                }
            };
            loop {
                let mut pull_again = false;
                let permit = loop {
                    tokio::select! {
                        biased;
                        () = shutdown.cancelled() => {
                            release(held.drain(..)).await;
                            release_buffered(&mut messages).await;
                            break 'fetch;
                        }
                        permit = Arc::clone(&permits).acquire_owned() => {
                            break permit.expect("the semaphore is never closed");
                        }
                        () = tokio::time::sleep(lease_every) => {
                            pull_again |= take_arrived(&mut messages, &mut held, usize::MAX);
                            for message in &held {
                                // A lost progress ack only risks a
                                // redelivery, which the inbox absorbs.
                                let _ = message.ack_with(AckKind::Progress).await;
                            }
                        }
                    }
                };
                let mut batch: Vec<jetstream::Message> =
                    held.drain(..held.len().min(self.batch_size)).collect();
                if batch.is_empty() && !pull_again {
                    let first = tokio::select! {
                        biased;
                        () = shutdown.cancelled() => {
                            release_buffered(&mut messages).await;
                            break 'fetch;
                        }
                        next = messages.next() => next,
                    };
                    match first {
                        Some(Ok(message)) => batch.push(message),
                        Some(Err(error)) => {
                            // Missed heartbeats, a reconnect: start a fresh pull.
                            tracing::warn!(consumer = %self.inner.name, error = %error, "pull consumer error; pulling again");
                            continue 'fetch;
                        }
                        None => {
                            tracing::warn!(consumer = %self.inner.name, "message stream ended; pulling again");
                            continue 'fetch;
                        }
                    }
                }
                // Whatever else has already arrived joins the batch: one
                // commit for many messages under load, no waiting when idle.
                if !pull_again {
                    let room = self.batch_size - batch.len();
                    let mut arrived = VecDeque::new();
                    pull_again = take_arrived(&mut messages, &mut arrived, room);
                    batch.extend(arrived);
                }
                failures = 0;
                if !batch.is_empty() {
                    let inner = Arc::clone(&self.inner);
                    let shutdown = shutdown.clone();
                    tracker.spawn(async move {
                        inner.process_batch(batch, &shutdown).await;
                        drop(permit);
                    });
                }
                if pull_again {
                    continue 'fetch;
                }
            }
        }
        tracker.close();
        tracker.wait().await;
    }
}

/// Every event of the contract, each routed to a handler that does
/// nothing: what a consumer of all of them would accept or refuse, for
/// tests and fuzzing of [`Router::check`].
pub fn contract_router() -> Router<()> {
    fn ignore<'a, E>(
        _: &'a (),
        _: &'a mut Context<'_>,
        _: E,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async { Ok(()) })
    }
    use shop_proto::{inventory::v1 as inventory, order::v1 as order, payment::v1 as payment};
    Router::new()
        .on::<shop_proto::user::v1::UserCreated, _>(ignore)
        .on::<order::OrderPlaced, _>(ignore)
        .on::<order::OrderConfirmed, _>(ignore)
        .on::<order::OrderCancelled, _>(ignore)
        .on::<inventory::InventoryReserved, _>(ignore)
        .on::<inventory::InventoryRejected, _>(ignore)
        .on::<inventory::InventoryReleased, _>(ignore)
        .on::<payment::PaymentCompleted, _>(ignore)
        .on::<payment::PaymentFailed, _>(ignore)
        .on::<payment::PaymentRefunded, _>(ignore)
}

/// A message that parsed and decoded, ready for its handler.
struct Prepared<'m, S> {
    envelope: Envelope,
    route: &'m Route<S>,
    decoded: Option<Decoded>,
}

impl<S: Send + Sync + 'static> Inner<S> {
    /// Handles a batch of messages in one transaction, each in a savepoint of
    /// its own so that one failure rolls back only its own effects; then
    /// settles each message. A transaction that failed for reasons that say
    /// nothing about the messages (the database unreachable, a deadlock) is
    /// tried again here, the messages kept meanwhile, instead of spending
    /// their deliveries; on shutdown they go back to JetStream.
    async fn process_batch(&self, batch: Vec<jetstream::Message>, shutdown: &CancellationToken) {
        let started = std::time::Instant::now();
        let mut outcomes: Vec<Option<Result<Outcome, Failure>>> = Vec::with_capacity(batch.len());
        let mut prepared = Vec::new();
        for (index, message) in batch.iter().enumerate() {
            match self.prepare(message) {
                Ok(Some(ready)) => {
                    outcomes.push(None);
                    prepared.push((index, ready));
                }
                Ok(None) => outcomes.push(Some(Ok(Outcome::Ignored))),
                Err(failure) => outcomes.push(Some(Err(failure))),
            }
        }
        if !prepared.is_empty() {
            let mut attempts = 0u32;
            let applied = loop {
                let applying = AssertUnwindSafe(self.apply(&mut prepared)).catch_unwind();
                let applied = tokio::select! {
                    applied = applying => applied,
                    never = self.keep_alive(&batch) => match never {},
                };
                match applied {
                    // Nothing is wrong with the messages: keep them (and
                    // their leases) for as long as it takes, rather than
                    // spend their deliveries on an outage or on a lock
                    // someone else holds. Each try is bounded by the
                    // session's statement and lock timeouts.
                    Ok(Err(BatchFailed::Passing(reason))) => {
                        attempts = attempts.saturating_add(1);
                        self.stats
                            .batches_tried_again
                            .fetch_add(1, Ordering::Relaxed);
                        self.metrics
                            .batches_tried_again
                            .get_or_create(&ConsumerLabels {
                                consumer: self.name.clone(),
                            })
                            .inc();
                        let delay = retry_here_delay(attempts);
                        tracing::warn!(consumer = %self.name, messages = batch.len(), attempts, ?delay, %reason, "batch failed; trying again");
                        tokio::select! {
                            () = shutdown.cancelled() => {
                                for message in &batch {
                                    let _ = message.ack_with(AckKind::Nak(None)).await;
                                }
                                return;
                            }
                            () = tokio::time::sleep(delay) => {}
                            never = self.keep_alive(&batch) => match never {},
                        }
                    }
                    other => break other,
                }
            };
            let results = match applied {
                Ok(Ok(results)) => results,
                Ok(Err(BatchFailed::Passing(reason) | BatchFailed::Other(reason))) => prepared
                    .iter()
                    .map(|_| Err(Failure::Transient(reason.clone())))
                    .collect(),
                Err(panic) => {
                    let reason = format!("batch panicked: {}", panic_message(&*panic));
                    prepared
                        .iter()
                        .map(|_| Err(Failure::Transient(reason.clone())))
                        .collect()
                }
            };
            for ((index, _), result) in prepared.iter().zip(results) {
                outcomes[*index] = Some(result);
            }
        }
        let elapsed = started.elapsed();
        for (message, outcome) in batch.iter().zip(outcomes) {
            let outcome =
                outcome.unwrap_or_else(|| Err(Failure::Transient("not processed".into())));
            self.settle(message, outcome, elapsed).await;
        }
    }

    /// Tells JetStream every third of the ack wait that the batch is still
    /// being worked on, so that a slow batch (waiting for locks, say) is not
    /// delivered again to another replica meanwhile; runs until dropped.
    async fn keep_alive(&self, batch: &[jetstream::Message]) -> std::convert::Infallible {
        let every = (self.ack_wait / 3).max(Duration::from_millis(100));
        loop {
            tokio::time::sleep(every).await;
            for message in batch {
                // A lost progress ack only risks a redelivery, which the
                // inbox absorbs.
                let _ = message.ack_with(AckKind::Progress).await;
            }
        }
    }

    /// Parses and decodes a message. `Ok(None)`: no route for its type.
    fn prepare<'m>(
        &'m self,
        message: &'m jetstream::Message,
    ) -> Result<Option<Prepared<'m, S>>, Failure> {
        let delivered = message.info().map(|info| info.delivered).unwrap_or(1);
        if delivered > self.retry.max_deliver {
            // Earlier deliveries died with their process before they could
            // be dead-lettered.
            return Err(Failure::Permanent(format!(
                "delivered {delivered} times, more than the {} allowed",
                self.retry.max_deliver
            )));
        }
        let envelope = Envelope::parse(
            original_subject(&self.name, &message.subject),
            message.headers.as_ref(),
            message.payload.clone(),
        )
        .map_err(|error| Failure::Permanent(error.to_string()))?;
        let Some((route, decoded)) = self.router.admit(&envelope).map_err(Failure::Permanent)?
        else {
            tracing::debug!(consumer = %self.name, event_type = %envelope.event_type, "no route; acked");
            return Ok(None);
        };
        Ok(Some(Prepared {
            envelope,
            route,
            decoded: Some(decoded),
        }))
    }

    /// Runs the prepared messages' handlers in one transaction. `Err` when
    /// the transaction itself failed: nothing was applied.
    async fn apply(
        &self,
        prepared: &mut [(usize, Prepared<'_, S>)],
    ) -> Result<Vec<Result<Outcome, Failure>>, BatchFailed> {
        let mut conn =
            self.pool.get().await.map_err(|error| {
                BatchFailed::Passing(format!("no database connection: {error}"))
            })?;
        match self.apply_together(&mut conn, prepared).await {
            Ok(results) => return Ok(results),
            // A lone message's failure is all there is to know: rolled back
            // whole, as a savepoint would have rolled it back.
            Err(Abandoned::HandlerFailed(error)) if prepared.len() == 1 => {
                return Ok(vec![Err(Failure::from(error))]);
            }
            // Someone failed: the careful path below finds out who.
            Err(Abandoned::HandlerFailed(_)) => {}
            Err(Abandoned::Database(error)) => return Err(BatchFailed::from(error)),
        }
        let (results, after_commit) = conn
            .transaction::<_, diesel::result::Error, _>(async |conn| {
                self.lock(conn, prepared, |_| true).await?;
                let mut results = Vec::with_capacity(prepared.len());
                let mut after_commit = Vec::new();
                for (_, ready) in prepared.iter_mut() {
                    // The handler runs in the message's span (`run_handler`).
                    let result = self.apply_in_savepoint(conn, ready).await?;
                    results.push(result.map(|(outcome, work)| {
                        after_commit.extend(work);
                        outcome
                    }));
                }
                Ok((results, after_commit))
            })
            .await
            .map_err(BatchFailed::from)?;
        after_commit.into_iter().for_each(|work| work());
        Ok(results)
    }

    /// Takes the advisory locks that the batch's events to be applied name
    /// (see [`Router::on_locking`]), in ascending key order, before any
    /// handler runs.
    async fn lock(
        &self,
        conn: &mut AsyncPgConnection,
        prepared: &mut [(usize, Prepared<'_, S>)],
        to_apply: impl Fn(&Envelope) -> bool,
    ) -> QueryResult<()> {
        // The events of each locking route, by event type.
        let mut by_route: BTreeMap<&str, (&Locks, Vec<&(dyn Any + Send + Sync)>)> = BTreeMap::new();
        for (_, ready) in prepared.iter_mut() {
            // An abandoned fast path consumed it; it decoded then, so it
            // decodes again.
            if ready.route.locks.is_some() && ready.decoded.is_none() {
                ready.decoded = (ready.route.decode)(&ready.envelope.body).ok();
            }
        }
        for (_, ready) in prepared
            .iter()
            .filter(|(_, ready)| to_apply(&ready.envelope))
        {
            if let (Some(locks), Some(decoded)) = (&ready.route.locks, ready.decoded.as_deref()) {
                by_route
                    .entry(ready.envelope.event_type.as_str())
                    .or_insert_with(|| (locks, Vec::new()))
                    .1
                    .push(decoded);
            }
        }
        let mut keys = Vec::new();
        for (locks, events) in by_route.into_values() {
            keys.extend(locks(conn, events).await?.iter().map(|name| lock_key(name)));
        }
        if keys.is_empty() {
            return Ok(());
        }
        keys.sort_unstable();
        keys.dedup();
        diesel::select(consumer_lock_keys(keys))
            .execute(conn)
            .await?;
        Ok(())
    }

    /// The fast path: one inbox insert for the whole batch and no
    /// savepoints. Abandoned (rolled back) as soon as any handler fails.
    async fn apply_together(
        &self,
        conn: &mut AsyncPgConnection,
        prepared: &mut [(usize, Prepared<'_, S>)],
    ) -> Result<Vec<Result<Outcome, Failure>>, Abandoned> {
        let (results, after_commit) = conn
            .transaction::<_, Abandoned, _>(async |conn| {
                let mut after_commit = Vec::new();
                let mut unique = HashSet::new();
                let rows: Vec<_> = prepared
                    .iter()
                    .map(|(_, ready)| ready.envelope.id)
                    .filter(|id| unique.insert(*id))
                    .map(|id| (inbox::consumer.eq(&self.name), inbox::event_id.eq(id)))
                    .collect();
                let fresh: HashSet<uuid::Uuid> = Cached(
                    diesel::insert_into(inbox::table)
                        .values(&rows)
                        .on_conflict_do_nothing()
                        .returning(inbox::event_id),
                )
                .get_results(conn)
                .await?
                .into_iter()
                .collect();
                // Locks after the inbox insert, and only for what is to be
                // applied: a batch waiting on another's uncommitted inbox row
                // holds no lock that batch could need.
                self.lock(conn, prepared, |envelope| fresh.contains(&envelope.id))
                    .await?;
                // Already in the inbox, or a second copy within this batch.
                let mut unique = HashSet::new();
                let mut results: Vec<Option<Result<Outcome, Failure>>> = prepared
                    .iter()
                    .map(|(_, ready)| {
                        let id = ready.envelope.id;
                        (!fresh.contains(&id) || !unique.insert(id))
                            .then_some(Ok(Outcome::Duplicate))
                    })
                    .collect();
                for first in 0..prepared.len() {
                    if results[first].is_some() {
                        continue;
                    }
                    let route = prepared[first].1.route;
                    // A batch route takes the batch's other new events of its
                    // type along.
                    let members: Vec<usize> = match route.handle {
                        Handle::One(_) => vec![first],
                        Handle::Batch(_) => (first..prepared.len())
                            .filter(|&index| {
                                results[index].is_none()
                                    && prepared[index].1.envelope.event_type
                                        == prepared[first].1.envelope.event_type
                            })
                            .collect(),
                    };
                    let group: Vec<&mut Prepared<'_, S>> = prepared
                        .iter_mut()
                        .enumerate()
                        .filter(|(index, _)| members.binary_search(index).is_ok())
                        .map(|(_, (_, ready))| ready)
                        .collect();
                    let work =
                        self.run_handler(conn, group)
                            .await
                            .map_err(|error| match into_passing(error) {
                                Ok(error) => Abandoned::Database(error),
                                Err(error) => Abandoned::HandlerFailed(error),
                            })?;
                    after_commit.extend(work);
                    for index in members {
                        results[index] = Some(Ok(Outcome::Applied));
                    }
                }
                let results = results
                    .into_iter()
                    .map(|result| result.unwrap_or(Ok(Outcome::Applied)))
                    .collect();
                Ok((results, after_commit))
            })
            .await?;
        after_commit.into_iter().for_each(|work| work());
        Ok(results)
    }

    /// The careful path for one message: inbox row, handler and emitted
    /// events in a savepoint, so that a failure undoes only this message.
    /// The outer `Err` is a failure that says nothing about the message
    /// (see [`passing`]): the whole batch is to be tried again.
    async fn apply_in_savepoint(
        &self,
        conn: &mut AsyncPgConnection,
        ready: &mut Prepared<'_, S>,
    ) -> Result<Result<(Outcome, Vec<AfterCommit>), Failure>, diesel::result::Error> {
        let result = conn
            .transaction::<_, HandlerError, _>(async |conn| {
                let inserted = diesel::insert_into(inbox::table)
                    .values((
                        inbox::consumer.eq(&self.name),
                        inbox::event_id.eq(ready.envelope.id),
                    ))
                    .on_conflict_do_nothing()
                    .execute(conn)
                    .await?;
                if inserted == 0 {
                    return Ok((Outcome::Duplicate, Vec::new()));
                }
                let work = self.run_handler(conn, vec![ready]).await?;
                Ok((Outcome::Applied, work))
            })
            .await;
        match result {
            Ok(applied) => Ok(Ok(applied)),
            Err(error) => match into_passing(error) {
                Ok(passing) => Err(passing),
                Err(error) => Ok(Err(Failure::from(error))),
            },
        }
    }

    /// Runs the handler of `group`'s messages (one message, or several of
    /// one batch route) and writes the events they emitted, each under its
    /// message's span; returns the after-commit work. A panicking handler is
    /// a transient failure.
    async fn run_handler(
        &self,
        conn: &mut AsyncPgConnection,
        mut group: Vec<&mut Prepared<'_, S>>,
    ) -> Result<Vec<AfterCommit>, HandlerError> {
        let Some(route) = <[_]>::first(&group).map(|ready| ready.route) else {
            return Ok(Vec::new());
        };
        // Decoded once in `prepare`; decoded again if an abandoned fast path
        // consumed it (it decoded before, so it decodes again).
        let mut decoded = Vec::with_capacity(group.len());
        for ready in &mut group {
            decoded.push(match ready.decoded.take() {
                Some(decoded) => decoded,
                None => (route.decode)(&ready.envelope.body)
                    .map_err(|error| HandlerError::permanent(error.to_string()))?,
            });
        }
        let envelopes: Vec<&Envelope> = group.iter().map(|ready| &ready.envelope).collect();
        let spans: Vec<tracing::Span> = envelopes
            .iter()
            .map(|envelope| consumer_span(&self.name, envelope))
            .collect();
        // One message runs in its span; the spans of several cover their
        // shared handling, each in its own saga's trace.
        let current = match spans.as_slice() {
            [span] => span.clone(),
            _ => tracing::Span::none(),
        };
        let (result, emitted, mut after_commit) = match &route.handle {
            Handle::One(handle) => {
                let mut decoded = decoded.into_iter();
                let (Some(decoded), None, [envelope]) =
                    (decoded.next(), decoded.next(), envelopes.as_slice())
                else {
                    return Err(HandlerError::permanent(
                        "internal: a one-event route got several",
                    ));
                };
                let mut cx = Context {
                    conn: &mut *conn,
                    envelope,
                    emitted: Vec::new(),
                    after_commit: Vec::new(),
                };
                let result = AssertUnwindSafe(handle(&self.state, &mut cx, decoded))
                    .catch_unwind()
                    .instrument(current)
                    .await;
                (result, vec![cx.emitted], cx.after_commit)
            }
            Handle::Batch(handle) => {
                let mut batch = Batch {
                    conn: &mut *conn,
                    emitted: vec![Vec::new(); envelopes.len()],
                    envelopes,
                    after_commit: Vec::new(),
                };
                let result = AssertUnwindSafe(handle(&self.state, &mut batch, decoded))
                    .catch_unwind()
                    .instrument(current)
                    .await;
                (result, batch.emitted, batch.after_commit)
            }
        };
        match result {
            Ok(result) => result?,
            Err(panic) => {
                return Err(HandlerError::transient(format!(
                    "handler panicked: {}",
                    panic_message(&*panic)
                )));
            }
        }
        let emitted: Vec<(&tracing::Span, Vec<OutgoingEvent>)> =
            spans.iter().zip(emitted).collect();
        if emitted.iter().any(|(_, events)| !events.is_empty()) {
            self.outbox.append_each(conn, &emitted).await?;
            let outbox = self.outbox.clone();
            after_commit.push(Box::new(move || outbox.committed()));
        }
        Ok(after_commit)
    }

    /// Acks, naks or dead-letters a message after its batch.
    async fn settle(
        &self,
        message: &jetstream::Message,
        outcome: Result<Outcome, Failure>,
        elapsed: Duration,
    ) {
        let (delivered, stream, sequence) = match message.info() {
            Ok(info) => (info.delivered, info.stream.to_owned(), info.stream_sequence),
            Err(error) => {
                tracing::error!(consumer = %self.name, error = %error, "message without JetStream metadata");
                return;
            }
        };
        let (ack, processed) = match outcome {
            Ok(Outcome::Applied) => {
                self.stats.applied.fetch_add(1, Ordering::Relaxed);
                (AckKind::Ack, Processed::Applied)
            }
            Ok(Outcome::Duplicate) => {
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                (AckKind::Ack, Processed::Duplicate)
            }
            Ok(Outcome::Ignored) => {
                self.stats.ignored.fetch_add(1, Ordering::Relaxed);
                (AckKind::Ack, Processed::Ignored)
            }
            Err(Failure::Transient(reason)) if delivered < self.retry.max_deliver => {
                let delay = self.retry.delay(delivered);
                let (order_id, trace_id) = saga_ids(message);
                tracing::warn!(consumer = %self.name, subject = %message.subject, order_id, trace_id, delivered, ?delay, %reason, "handler failed; retrying");
                self.stats.retried.fetch_add(1, Ordering::Relaxed);
                (AckKind::Nak(Some(delay)), Processed::Retried)
            }
            Err(Failure::Transient(reason)) => {
                let reason = format!("gave up after {delivered} deliveries: {reason}");
                self.dead_letter(message, &reason, delivered, &stream, sequence)
                    .await
            }
            Err(Failure::Permanent(reason)) => {
                self.dead_letter(message, &reason, delivered, &stream, sequence)
                    .await
            }
        };
        self.observe(message, processed, elapsed);
        if let Some(hook) = &self.hook {
            hook(message, processed, elapsed);
        }
        if let Err(error) = message.ack_with(ack).await {
            // The message comes back after the ack wait; the inbox makes
            // that harmless.
            tracing::warn!(consumer = %self.name, error = %error, "acknowledgement failed");
        }
    }

    fn observe(&self, message: &jetstream::Message, processed: Processed, elapsed: Duration) {
        let subject = original_subject(&self.name, &message.subject).to_owned();
        let outcome = match processed {
            Processed::Applied => "ok",
            Processed::Duplicate => "duplicate",
            Processed::Ignored => "ignored",
            Processed::Retried => "retried",
            Processed::DeadLettered => "dead_lettered",
        };
        if processed == Processed::Applied {
            self.metrics
                .handling
                .get_or_create(&HandlerLabels {
                    consumer: self.name.clone(),
                    subject: subject.clone(),
                })
                .observe(elapsed.as_secs_f64());
        }
        self.metrics
            .consumed
            .get_or_create(&ConsumedLabels {
                consumer: self.name.clone(),
                subject,
                outcome,
            })
            .inc();
    }

    /// Publishes the message to `dlq.<consumer>.<subject>` and returns how to
    /// settle the original: terminate it once the dead letter is stored, or
    /// retry later if even that failed, so that it is never lost.
    async fn dead_letter(
        &self,
        message: &jetstream::Message,
        reason: &str,
        delivered: i64,
        stream: &str,
        sequence: u64,
    ) -> (AckKind, Processed) {
        let mut headers = message.headers.clone().unwrap_or_default();
        // Dead-lettering the same delivery twice (a crash before the
        // terminate) stores one dead letter.
        headers.insert(
            crate::envelope::headers::NATS_MSG_ID,
            format!("{}:{stream}:{sequence}", self.name).as_str(),
        );
        headers.insert(dead_letter_headers::REASON, single_line(reason).as_str());
        headers.insert(dead_letter_headers::CONSUMER, self.name.as_str());
        headers.insert(
            dead_letter_headers::DELIVERIES,
            delivered.to_string().as_str(),
        );
        headers.insert(dead_letter_headers::STREAM, stream);
        headers.insert(
            dead_letter_headers::STREAM_SEQUENCE,
            sequence.to_string().as_str(),
        );
        // A replayed message that fails again is filed under its first subject.
        let original = original_subject(&self.name, &message.subject);
        headers.insert(dead_letter_headers::SUBJECT, original);
        let subject = format!("dlq.{}.{original}", self.name);
        let publish = PublishMessage::build()
            .payload(message.payload.clone())
            .headers(headers);
        let stored = match self.js.send_publish(subject.clone(), publish).await {
            Ok(ack) => ack.await.map(drop).map_err(|error| error.to_string()),
            Err(error) => Err(error.to_string()),
        };
        match stored {
            Ok(()) => {
                self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                let (order_id, trace_id) = saga_ids(message);
                tracing::error!(consumer = %self.name, %subject, order_id, trace_id, sequence, delivered, %reason, "message dead-lettered");
                (AckKind::Term, Processed::DeadLettered)
            }
            Err(error) => {
                let (order_id, trace_id) = saga_ids(message);
                tracing::error!(consumer = %self.name, %subject, order_id, trace_id, %error, "cannot store the dead letter; will retry");
                (AckKind::Nak(Some(self.retry.max)), Processed::Retried)
            }
        }
    }
}

/// The saga's order id and trace id from a message's headers, for the log
/// lines written outside its processing span; empty when absent.
fn saga_ids(message: &jetstream::Message) -> (&str, &str) {
    let header = |name: &str| {
        message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(name))
            .map_or("", |value| value.as_str())
    };
    let trace_id = header(crate::envelope::headers::TRACEPARENT)
        .split('-')
        .nth(1)
        .unwrap_or_default();
    (header(crate::envelope::headers::CORRELATION_ID), trace_id)
}

/// The consumer-kind span of one message, a child of the producer's span.
fn consumer_span(consumer: &str, envelope: &Envelope) -> tracing::Span {
    let span = tracing::info_span!(
        "process",
        otel.name = format!("{} process", envelope.subject),
        otel.kind = "consumer",
        shop.service = %consumer,
        messaging.system = "nats",
        messaging.operation.type = "process",
        messaging.destination.name = %envelope.subject,
        messaging.consumer.group.name = %consumer,
        messaging.message.id = %envelope.id,
        order_id = envelope.correlation_id.as_deref().unwrap_or_default(),
        trace_id = tracing::field::Empty,
    );
    trace::continue_from(
        &span,
        envelope.traceparent.as_deref(),
        envelope.tracestate.as_deref(),
    );
    span.record("trace_id", trace::trace_id(&span));
    span
}

/// Naks the messages already fetched into the client's buffer, so that
/// another replica gets them at once instead of after the ack wait.
async fn release_buffered(messages: &mut jetstream::consumer::pull::Stream) {
    while let Some(Some(Ok(message))) = messages.next().now_or_never() {
        let _ = message.ack_with(AckKind::Nak(None)).await;
    }
}

/// Naks messages taken from the stream but not started.
async fn release(messages: impl Iterator<Item = jetstream::Message>) {
    for message in messages {
        let _ = message.ack_with(AckKind::Nak(None)).await;
    }
}

/// Moves up to `room` messages that have already arrived into `into`,
/// without waiting. `true` when the pull broke (an error, the stream
/// ended) and must be started again.
fn take_arrived(
    messages: &mut jetstream::consumer::pull::Stream,
    into: &mut VecDeque<jetstream::Message>,
    room: usize,
) -> bool {
    let mut taken = 0;
    while taken < room {
        match messages.next().now_or_never() {
            Some(Some(Ok(message))) => {
                into.push_back(message);
                taken += 1;
            }
            Some(Some(Err(_)) | None) => return true,
            None => break,
        }
    }
    false
}

/// Deletes inbox rows older than `retention`, hourly.
async fn prune_inbox<S>(inner: Arc<Inner<S>>, retention: Duration, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let cutoff = chrono::Utc::now() - retention;
        let result = async {
            let mut conn = inner.pool.get().await.map_err(|error| error.to_string())?;
            diesel::delete(
                inbox::table
                    .filter(inbox::consumer.eq(&inner.name))
                    .filter(inbox::received_at.lt(cutoff)),
            )
            .execute(&mut conn)
            .await
            .map_err(|error| error.to_string())
        }
        .await;
        if let Err(error) = result {
            tracing::warn!(consumer = %inner.name, %error, "inbox pruning failed");
        }
    }
}

fn reconnect_delay(failures: u32) -> Duration {
    Duration::from_millis(200u64 << failures.min(5)).min(Duration::from_secs(5))
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic".to_owned())
}

/// Header values cannot hold line breaks.
fn single_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
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
        };
        let delays: Vec<_> = (1..=5)
            .map(|delivered| policy.delay(delivered).as_millis())
            .collect();
        assert_eq!(delays, [100, 200, 400, 700, 700]);
        assert_eq!(policy.delay(i64::MAX), Duration::from_millis(700));
    }

    #[test]
    fn a_dead_letter_reason_stays_on_one_line() {
        assert_eq!(single_line("bad\r\nthing\nhere"), "bad  thing here");
    }
}
