//! What a handler sees: its [`Context`] (or [`Batch`]) and how it fails
//! ([`HandlerError`]).

use crate::Event;
use diesel_async::AsyncPgConnection;

use crate::envelope::{Envelope, OutgoingEvent};

/// How a handler failed.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth retrying: the database or a dependency was unavailable, a
    /// serialisation conflict, ... Retried with backoff, then dead-lettered.
    #[error("retryable: {0}")]
    Retryable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Never going to succeed for this message: it is dead-lettered at once.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl HandlerError {
    /// A failure worth retrying.
    pub fn retryable(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Retryable(error.into())
    }

    /// A failure that retrying cannot fix, with a reason for people.
    pub fn permanent(reason: impl Into<String>) -> Self {
        Self::Permanent(reason.into())
    }

    /// Whether this is a serialization failure: what a step in one
    /// statement read changed before its write (see `stale_unless`), so
    /// that nothing was written and the step is to be read and decided
    /// again.
    pub fn is_stale(&self) -> bool {
        matches!(
            self,
            Self::Retryable(source) if matches!(
                source.downcast_ref::<diesel::result::Error>(),
                Some(diesel::result::Error::DatabaseError(
                    diesel::result::DatabaseErrorKind::SerializationFailure,
                    _
                ))
            )
        )
    }
}

/// `event`, correlated like `cause` and caused by it.
fn caused_by<E: Event>(cause: &Envelope, event: &E) -> OutgoingEvent {
    let mut outgoing = OutgoingEvent::new(event).caused_by(cause.id);
    outgoing.correlation_id = cause.correlation_id.clone();
    outgoing
}

/// Parses an event's UUID field; a malformed one is a permanent failure.
pub fn uuid_field(field: &str, value: &str) -> Result<uuid::Uuid, HandlerError> {
    uuid::Uuid::parse_str(value)
        .map_err(|_| HandlerError::permanent(format!("{field} is not a UUID: {value:?}")))
}

impl From<diesel::result::Error> for HandlerError {
    fn from(error: diesel::result::Error) -> Self {
        Self::retryable(error)
    }
}

/// What a handler works with: the transaction's connection, the envelope of
/// the event being handled, and the events it emits, which are written to
/// the outbox in the same transaction after the handler returns.
pub struct Context<'c> {
    pub(super) conn: &'c mut AsyncPgConnection,
    pub(super) envelope: &'c Envelope,
    pub(super) emitted: Vec<OutgoingEvent>,
    pub(super) after_commit: Vec<AfterCommit>,
}

/// Work that must happen only once the handler's transaction committed.
pub(super) type AfterCommit = Box<dyn FnOnce() + Send>;

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
        self.emitted.push(caused_by(self.envelope, event));
    }
}

/// What a batch handler (see [`Route::batched`](super::Route::batched)) works with: the
/// transaction's connection and the envelopes of the events it handles,
/// indexed like the events it is given.
pub struct Batch<'c> {
    pub(super) conn: &'c mut AsyncPgConnection,
    pub(super) envelopes: Vec<&'c Envelope>,
    pub(super) emitted: Vec<Vec<OutgoingEvent>>,
    pub(super) after_commit: Vec<AfterCommit>,
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
        self.emitted[index].push(caused_by(self.envelopes[index], event));
    }
}

/// What a handler that applies a batch in one statement of its own works
/// with (see [`Route::in_one_statement`](super::Route::in_one_statement)):
/// a connection outside any transaction, so that each statement commits by
/// itself, the envelopes of the events it handles, indexed like the events
/// it is given, and what its one writing statement must carry
/// ([`Statement::carry`]).
pub struct Statement<'c> {
    pub(super) conn: &'c mut AsyncPgConnection,
    pub(super) envelopes: Vec<&'c Envelope>,
    pub(super) emitted: Vec<Vec<OutgoingEvent>>,
    pub(super) after_commit: Vec<AfterCommit>,
    pub(super) consumer: &'c str,
    pub(super) outbox: &'c crate::outbox::Outbox,
    /// The events' spans, indexed like them.
    pub(super) spans: &'c [tracing::Span],
    /// What [`Statement::carry`] handed out, if it was called.
    pub(super) carried: Option<crate::outbox::Written>,
    pub(super) emitted_after_carry: bool,
}

impl std::fmt::Debug for Statement<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Statement")
            .field("envelopes", &self.envelopes)
            .field("emitted", &self.emitted)
            .field("carried", &self.carried.is_some())
            .finish_non_exhaustive()
    }
}

impl Statement<'_> {
    /// A connection outside any transaction: every statement on it commits
    /// by itself. Read with it (without locks), then write once, carrying
    /// [`Statement::carry`].
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

    /// Runs `work` once the handler's statement has committed (see
    /// [`Context::after_commit`]).
    pub fn after_commit(&mut self, work: impl FnOnce() + Send + 'static) {
        self.after_commit.push(Box::new(work));
    }

    /// Emits `event` as caused by the `index`-th event (see
    /// [`Batch::emit`]); written by the statement that carries
    /// [`Statement::carry`], so emit everything before calling it.
    ///
    /// # Panics
    /// If there is no such event.
    pub fn emit<E: Event>(&mut self, index: usize, event: &E) {
        if self.carried.is_some() {
            self.emitted_after_carry = true;
        }
        self.emitted[index].push(caused_by(self.envelopes[index], event));
    }

    /// What the handler's one writing statement must carry, for the events
    /// emitted so far: the events' inbox rows (`inbox_write(consumer,
    /// ids)`) and the emitted events (`outbox_write(events)`), both
    /// functions of the messaging migrations, called in the same statement
    /// as the change, so that all of it commits or none. A handler that
    /// changes nothing does not call it: the consumer then records the
    /// inbox rows, and writes what was emitted, in a statement of its own.
    ///
    /// # Panics
    /// If called twice: a handler writes once.
    pub fn carry(&mut self) -> Carried {
        assert!(
            self.carried.is_none(),
            "Statement::carry is for the handler's one write"
        );
        let emitted = self
            .spans
            .iter()
            .zip(self.emitted.iter_mut().map(std::mem::take))
            .collect();
        let rows = self.outbox.rows_each(emitted);
        let carried = Carried {
            consumer: self.consumer.to_owned(),
            ids: self.envelopes.iter().map(|envelope| envelope.id).collect(),
            events: rows.json(),
        };
        self.carried = Some(rows);
        carried
    }
}

/// What a one-statement handler's writing statement binds (see
/// [`Statement::carry`]):
///
/// ```sql
/// WITH moved AS (UPDATE ... WHERE <what was read still holds> RETURNING ...),
///      checked AS (SELECT stale_unless((SELECT count(*) FROM moved) = $2, 'orders')),
///      carried AS (SELECT inbox_write($7, $8::uuid[]), outbox_write($9::jsonb) FROM checked)
/// SELECT count(*) FROM carried
/// ```
#[derive(Debug)]
pub struct Carried {
    pub(super) consumer: String,
    pub(super) ids: Vec<uuid::Uuid>,
    pub(super) events: String,
}

impl Carried {
    /// Nothing to carry: no inbox row, no event. For a one-statement
    /// handler's write run outside a consumer (a test of the step, a tool).
    pub fn nothing() -> Self {
        Self {
            consumer: String::new(),
            ids: Vec::new(),
            events: "[]".into(),
        }
    }

    /// `inbox_write`'s first argument.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// `inbox_write`'s second argument: the ids of the events handled.
    pub fn event_ids(&self) -> &[uuid::Uuid] {
        &self.ids
    }

    /// `outbox_write`'s argument: the events emitted.
    pub fn events_json(&self) -> &str {
        &self.events
    }
}
