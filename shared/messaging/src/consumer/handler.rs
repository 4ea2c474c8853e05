//! What a handler sees: its [`Context`] (or [`Batch`]) and how it fails
//! ([`HandlerError`]).

use diesel_async::AsyncPgConnection;
use shop_proto::Event;

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
        let mut outgoing = OutgoingEvent::new(event).caused_by(self.envelope.id);
        outgoing.correlation_id = self.envelope.correlation_id.clone();
        self.emitted.push(outgoing);
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
        let cause = self.envelopes[index];
        let mut outgoing = OutgoingEvent::new(event).caused_by(cause.id);
        outgoing.correlation_id = cause.correlation_id.clone();
        self.emitted[index].push(outgoing);
    }
}
