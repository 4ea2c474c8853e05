//! The routing table from `ce-type` to handler, and what a consumer makes
//! of a message before any handler runs ([`Router::check`]).

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;

use crate::Event;
use diesel::QueryResult;
use diesel_async::AsyncPgConnection;

use super::handler::{Batch, Context, HandlerError, Statement};
use crate::BoxFuture;
use crate::envelope::Envelope;

/// Handles events of type `E` one at a time, in the transaction of the
/// message that carried the event ([`Route::single`]). A service's handler
/// state implements it once for each event type it takes this way:
///
/// ```
/// # use pg_jetstream::{Context, Handler, HandlerError, Route, Router};
/// # #[derive(Clone, PartialEq, prost::Message)]
/// # pub struct AccountOpened { #[prost(string, tag = "1")] pub account_id: String }
/// # impl pg_jetstream::Event for AccountOpened {
/// #     const TYPE: &'static str = "bank.v1.AccountOpened";
/// #     const SUBJECT: &'static str = "account.opened";
/// # }
/// struct Ledger;
///
/// impl Handler<AccountOpened> for Ledger {
///     async fn handle(&self, cx: &mut Context<'_>, event: AccountOpened) -> Result<(), HandlerError> {
///         let _ = (cx.conn(), event.account_id);
///         Ok(())
///     }
/// }
///
/// let router = Router::new().on::<AccountOpened>(Route::single());
/// # let _: Router<Ledger> = router;
/// ```
pub trait Handler<E: Event>: Send + Sync + 'static {
    /// Applies `event` with `cx`'s connection, and emits what it causes
    /// with [`Context::emit`].
    fn handle(
        &self,
        cx: &mut Context<'_>,
        event: E,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// Handles all of a batch's new events of type `E` in one call
/// ([`Route::batched`]): a few statements per batch instead of a few per
/// event.
pub trait BatchHandler<E: Event>: Send + Sync + 'static {
    /// Applies `events`, in the order they arrived, with `batch`'s
    /// connection; what it emits names the event that caused it
    /// ([`Batch::emit`]).
    fn handle_batch(
        &self,
        batch: &mut Batch<'_>,
        events: Vec<E>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// Handles all of a batch's new events of type `E` in one call, without a
/// transaction ([`Route::in_one_statement`]): it reads what it decides on
/// without locks, decides, and writes once, in one statement that commits
/// by itself and carries [`Statement::carry`] — the events' inbox rows and
/// what it emits — and writes only if what it read still holds (else
/// `stale_unless` undoes the statement and the batch is read and decided
/// again). Two statements per batch, and no `BEGIN` or `COMMIT`.
pub trait StatementHandler<E: Event>: Send + Sync + 'static {
    /// Applies `events`, in the order they arrived, as
    /// [`BatchHandler::handle_batch`] would, with `step`'s connection.
    fn handle_in_statement(
        &self,
        step: &mut Statement<'_>,
        events: Vec<E>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// Names what the handler of events of type `E` will lock
/// ([`Route::locking`]).
pub trait LockNames<E: Event>: Send + Sync + 'static {
    /// The names (`"product:LAMP"`, say) of what handling `events` will
    /// lock: all of a batch's events of type `E` at once. May query (once,
    /// in the batch's transaction) when the events do not carry the names.
    fn lock_names(
        &self,
        conn: &mut AsyncPgConnection,
        events: Vec<&E>,
    ) -> impl Future<Output = QueryResult<Vec<String>>> + Send;
}

/// A shared handler handles what it handles.
impl<E: Event, S: Handler<E>> Handler<E> for std::sync::Arc<S> {
    fn handle(
        &self,
        cx: &mut Context<'_>,
        event: E,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        S::handle(self, cx, event)
    }
}

impl<E: Event, S: BatchHandler<E>> BatchHandler<E> for std::sync::Arc<S> {
    fn handle_batch(
        &self,
        batch: &mut Batch<'_>,
        events: Vec<E>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        S::handle_batch(self, batch, events)
    }
}

impl<E: Event, S: StatementHandler<E>> StatementHandler<E> for std::sync::Arc<S> {
    fn handle_in_statement(
        &self,
        step: &mut Statement<'_>,
        events: Vec<E>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        S::handle_in_statement(self, step, events)
    }
}

impl<E: Event, S: LockNames<E>> LockNames<E> for std::sync::Arc<S> {
    fn lock_names(
        &self,
        conn: &mut AsyncPgConnection,
        events: Vec<&E>,
    ) -> impl Future<Output = QueryResult<Vec<String>>> + Send {
        S::lock_names(self, conn, events)
    }
}

type HandleOne<S> =
    for<'a, 'c> fn(&'a S, &'a mut Context<'c>, &'a [u8]) -> BoxFuture<'a, Result<(), HandlerError>>;
type HandleBatch<S> = for<'a, 'c> fn(
    &'a S,
    &'a mut Batch<'c>,
    Vec<&'a [u8]>,
) -> BoxFuture<'a, Result<(), HandlerError>>;
type HandleStatement<S> = for<'a, 'c> fn(
    &'a S,
    &'a mut Statement<'c>,
    Vec<&'a [u8]>,
) -> BoxFuture<'a, Result<(), HandlerError>>;
pub(super) type Locks<S> = for<'a> fn(
    &'a S,
    &'a mut AsyncPgConnection,
    Vec<&'a [u8]>,
) -> BoxFuture<'a, QueryResult<Vec<String>>>;

/// A route's handler: for one event at a time, or for all of a batch's
/// events of its type at once, in the batch's transaction or in one
/// statement of its own.
pub(super) enum Handle<S> {
    One(HandleOne<S>),
    Batch(HandleBatch<S>),
    Statement(HandleStatement<S>),
}

// Function pointers all: copied whatever `S` is.
impl<S> Clone for Handle<S> {
    fn clone(&self) -> Self {
        match self {
            Self::One(handle) => Self::One(*handle),
            Self::Batch(handle) => Self::Batch(*handle),
            Self::Statement(handle) => Self::Statement(*handle),
        }
    }
}

/// How events of type `E` are handled by a state `S`: declared once, with
/// its options, in [`Router::on`]. `K` is where the handler runs,
/// [`InTransaction`] or [`InOneStatement`], so that an option that only
/// one of them can honour is not offered on the other.
pub struct Route<S, E, K = InTransaction> {
    handle: Handle<S>,
    locks: Option<Locks<S>>,
    event: PhantomData<fn(E, K)>,
}

/// Where a [`Route`]'s handler runs: [`InTransaction`] or
/// [`InOneStatement`], and nothing else.
pub trait RouteKind: sealed::Sealed {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::InTransaction {}
    impl Sealed for super::InOneStatement {}
}

impl RouteKind for InTransaction {}
impl RouteKind for InOneStatement {}

/// A [`Route`] whose handler runs in the batch's transaction
/// ([`Route::single`], [`Route::batched`]): it may take locks.
#[derive(Debug, Clone, Copy)]
pub enum InTransaction {}

/// A [`Route`] whose handler runs as one statement of its own
/// ([`Route::in_one_statement`]): it holds no lock past that statement,
/// so it has no [`Route::locking`].
#[derive(Debug, Clone, Copy)]
pub enum InOneStatement {}

impl<S, E, K> std::fmt::Debug for Route<S, E, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("batched", &!matches!(self.handle, Handle::One(_)))
            .field(
                "in_one_statement",
                &matches!(self.handle, Handle::Statement(_)),
            )
            .field("locking", &self.locks.is_some())
            .finish()
    }
}

impl<S: Send + Sync + 'static, E: Event> Route<S, E, InTransaction> {
    /// One event at a time, by `S`'s [`Handler<E>`].
    pub fn single() -> Self
    where
        S: Handler<E>,
    {
        fn handle<'a, S: Handler<E>, E: Event>(
            state: &'a S,
            cx: &'a mut Context<'_>,
            body: &'a [u8],
        ) -> BoxFuture<'a, Result<(), HandlerError>> {
            match E::decode(body) {
                Ok(event) => Box::pin(state.handle(cx, event)),
                Err(error) => Box::pin(std::future::ready(Err(undecodable::<E>(&error)))),
            }
        }
        Self {
            handle: Handle::One(handle::<S, E>),
            locks: None,
            event: PhantomData,
        }
    }

    /// All of a batch's new events of type `E` at once, in the order they
    /// arrived, by `S`'s [`BatchHandler<E>`].
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
    ///
    /// A state that handles the type only one at a time cannot take a
    /// batched route:
    ///
    /// ```compile_fail,E0277
    /// # use pg_jetstream::{Context, Handler, HandlerError, Route, Router};
    /// # #[derive(Clone, PartialEq, prost::Message)]
    /// # pub struct AccountOpened { #[prost(string, tag = "1")] pub account_id: String }
    /// # impl pg_jetstream::Event for AccountOpened {
    /// #     const TYPE: &'static str = "bank.v1.AccountOpened";
    /// #     const SUBJECT: &'static str = "account.opened";
    /// # }
    /// struct OneAtATime;
    ///
    /// impl Handler<AccountOpened> for OneAtATime {
    ///     async fn handle(&self, _: &mut Context<'_>, _: AccountOpened) -> Result<(), HandlerError> {
    ///         Ok(())
    ///     }
    /// }
    ///
    /// let router: Router<OneAtATime> = Router::new().on::<AccountOpened>(Route::batched());
    /// ```
    pub fn batched() -> Self
    where
        S: BatchHandler<E>,
    {
        fn handle<'a, S: BatchHandler<E>, E: Event>(
            state: &'a S,
            batch: &'a mut Batch<'_>,
            bodies: Vec<&'a [u8]>,
        ) -> BoxFuture<'a, Result<(), HandlerError>> {
            match bodies.into_iter().map(E::decode).collect() {
                Ok(events) => Box::pin(state.handle_batch(batch, events)),
                Err(error) => Box::pin(std::future::ready(Err(undecodable::<E>(&error)))),
            }
        }
        Self {
            handle: Handle::Batch(handle::<S, E>),
            locks: None,
            event: PhantomData,
        }
    }

    /// Names what the handler will lock, by `S`'s [`LockNames<E>`]. Before
    /// any handler of a batch runs, the batch takes a transaction-level
    /// advisory lock on every name its events give, all in one global
    /// order. Batches that touch the same rows — on this consumer, on
    /// another replica or on another consumer of the same database — then
    /// wait for each other instead of each holding a row the other needs (a
    /// deadlock, which PostgreSQL breaks only after a second).
    #[must_use]
    pub fn locking(mut self) -> Self
    where
        S: LockNames<E>,
    {
        fn names<'a, S: LockNames<E>, E: Event>(
            state: &'a S,
            conn: &'a mut AsyncPgConnection,
            bodies: Vec<&'a [u8]>,
        ) -> BoxFuture<'a, QueryResult<Vec<String>>> {
            Box::pin(async move {
                // Each decoded when it was admitted, so each decodes again.
                let events: Vec<E> = bodies
                    .into_iter()
                    .filter_map(|body| E::decode(body).ok())
                    .collect();
                state.lock_names(conn, events.iter().collect()).await
            })
        }
        self.locks = Some(names::<S, E>);
        self
    }
}

impl<S: Send + Sync + 'static, E: Event> Route<S, E, InOneStatement> {
    /// All of a batch's new events of type `E` at once, in one statement
    /// of the handler's own, by `S`'s [`StatementHandler<E>`]: no
    /// transaction, no locks. The batch's events of this type are applied
    /// apart from its events of other types, before them, each route's in
    /// a statement of its own; if the handler fails, each event is tried on
    /// its own, as with [`Route::batched`].
    ///
    /// Such a route takes no locks, and asking it to does not compile:
    ///
    /// ```compile_fail,E0599
    /// # use pg_jetstream::{Route, Router, HandlerError, consumer::{Statement, StatementHandler}};
    /// # use pg_jetstream::consumer::LockNames;
    /// # #[derive(Clone, PartialEq, prost::Message)]
    /// # pub struct SeatHeld { #[prost(string, tag = "1")] pub seat: String }
    /// # impl pg_jetstream::Event for SeatHeld {
    /// #     const TYPE: &'static str = "travel.v1.SeatHeld";
    /// #     const SUBJECT: &'static str = "seat.held";
    /// # }
    /// struct Seats;
    ///
    /// impl StatementHandler<SeatHeld> for Seats {
    ///     async fn handle_in_statement(
    ///         &self,
    ///         _: &mut Statement<'_>,
    ///         _: Vec<SeatHeld>,
    ///     ) -> Result<(), HandlerError> {
    ///         Ok(())
    ///     }
    /// }
    ///
    /// impl LockNames<SeatHeld> for Seats {
    ///     async fn lock_names(
    ///         &self,
    ///         _: &mut diesel_async::AsyncPgConnection,
    ///         events: Vec<&SeatHeld>,
    ///     ) -> diesel::QueryResult<Vec<String>> {
    ///         Ok(events.iter().map(|event| event.seat.clone()).collect())
    ///     }
    /// }
    ///
    /// let router: Router<Seats> =
    ///     Router::new().on::<SeatHeld>(Route::in_one_statement().locking());
    /// ```
    pub fn in_one_statement() -> Self
    where
        S: StatementHandler<E>,
    {
        fn handle<'a, S: StatementHandler<E>, E: Event>(
            state: &'a S,
            step: &'a mut Statement<'_>,
            bodies: Vec<&'a [u8]>,
        ) -> BoxFuture<'a, Result<(), HandlerError>> {
            match bodies.into_iter().map(E::decode).collect() {
                Ok(events) => Box::pin(state.handle_in_statement(step, events)),
                Err(error) => Box::pin(std::future::ready(Err(undecodable::<E>(&error)))),
            }
        }
        Self {
            handle: Handle::Statement(handle::<S, E>),
            locks: None,
            event: PhantomData,
        }
    }
}

fn undecodable<E: Event>(error: &prost::DecodeError) -> HandlerError {
    HandlerError::permanent(format!("body is not a valid {}: {error}", E::TYPE))
}

/// A route as the table keeps it.
pub(super) struct Entry<S> {
    /// The one subject events of this type are published on.
    pub(super) subject: &'static str,
    decodes: fn(&[u8]) -> Result<(), prost::DecodeError>,
    pub(super) handle: Handle<S>,
    pub(super) locks: Option<Locks<S>>,
}

impl<S> Clone for Entry<S> {
    fn clone(&self) -> Self {
        Self {
            subject: self.subject,
            decodes: self.decodes,
            handle: self.handle.clone(),
            locks: self.locks,
        }
    }
}

/// The routing table from `ce-type` to handler: the whole of a service's
/// event adapter, one [`Route`] per event type it consumes:
///
/// ```text
/// Router::new()
///     .on::<TicketBooked>(Route::in_one_statement())
///     .on::<BookingCancelled>(Route::single().locking())
/// ```
pub struct Router<S> {
    pub(super) routes: HashMap<&'static str, Entry<S>>,
    pub(super) subjects: Vec<&'static str>,
}

impl<S> std::fmt::Debug for Router<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("subjects", &self.subjects)
            .finish()
    }
}

impl<S> Clone for Router<S> {
    fn clone(&self) -> Self {
        Self {
            routes: self.routes.clone(),
            subjects: self.subjects.clone(),
        }
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

    /// Routes events of type `E` as `route` says.
    #[must_use]
    pub fn on<E: Event>(mut self, route: Route<S, E, impl RouteKind>) -> Self {
        fn decodes<E: Event>(body: &[u8]) -> Result<(), prost::DecodeError> {
            E::decode(body).map(drop)
        }
        self.routes.insert(
            E::TYPE,
            Entry {
                subject: E::SUBJECT,
                decodes: decodes::<E>,
                handle: route.handle,
                locks: route.locks,
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

    /// The route of a parsed envelope whose body decodes; `Ok(None)` when
    /// no route takes its type; `Err(reason)` when it must be
    /// dead-lettered.
    pub(super) fn admit(&self, envelope: &Envelope) -> Result<Option<&Entry<S>>, String> {
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
        (route.decodes)(&envelope.body)
            .map_err(|error| format!("body is not a valid {}: {error}", envelope.event_type))?;
        Ok(Some(route))
    }
}
