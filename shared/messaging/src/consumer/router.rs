//! The routing table from `ce-type` to handler, and what a consumer makes
//! of a message before any handler runs ([`Router::check`]).

use std::any::Any;
use std::collections::HashMap;

use diesel::QueryResult;
use diesel_async::AsyncPgConnection;
use shop_proto::Event;

use super::handler::{Batch, Context, HandlerError};
use crate::BoxFuture;
use crate::envelope::Envelope;

pub(super) type Decoded = Box<dyn Any + Send + Sync>;
pub(super) type HandleOne<S> = Box<
    dyn for<'a, 'c> Fn(
            &'a S,
            &'a mut Context<'c>,
            Decoded,
        ) -> BoxFuture<'a, Result<(), HandlerError>>
        + Send
        + Sync,
>;
pub(super) type HandleBatch<S> = Box<
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
pub(super) enum Handle<S> {
    One(HandleOne<S>),
    Batch(HandleBatch<S>),
}

/// What a route's handler will lock for the batch's events of its type,
/// named from the events (looked up in the batch's transaction when the
/// events alone do not say).
pub(super) type Locks = Box<
    dyn for<'a> Fn(
            &'a mut AsyncPgConnection,
            Vec<&'a (dyn Any + Send + Sync)>,
        ) -> BoxFuture<'a, QueryResult<Vec<String>>>
        + Send
        + Sync,
>;

/// The failure of a handler given another type than its route decodes;
/// cannot happen, since the route's `decode` is the only producer.
pub(super) fn wrong_type<'a>() -> BoxFuture<'a, Result<(), HandlerError>> {
    Box::pin(async { Err(HandlerError::permanent("internal: decoded the wrong type")) })
}

pub(super) struct Route<S> {
    /// The one subject events of this type are published on.
    pub(super) subject: &'static str,
    pub(super) decode: fn(&[u8]) -> Result<Decoded, prost::DecodeError>,
    pub(super) handle: Handle<S>,
    pub(super) locks: Option<Locks>,
}

/// The routing table from `ce-type` to handler: the whole of a service's
/// event adapter.
///
/// Handlers are functions of the shape
/// `fn on_x<'a>(state: &'a S, cx: &'a mut Context<'_>, event: X) -> BoxFuture<'a, Result<(), HandlerError>>`.
pub struct Router<S> {
    pub(super) routes: HashMap<&'static str, Route<S>>,
    pub(super) subjects: Vec<&'static str>,
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
    pub(super) fn admit(
        &self,
        envelope: &Envelope,
    ) -> Result<Option<(&Route<S>, Decoded)>, String> {
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
