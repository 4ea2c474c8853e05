//! Transactional messaging between PostgreSQL and NATS JetStream, so that
//! no service loses, duplicates or blocks on an event: a service writes its
//! events in the same transaction (or the same statement) as its state, and
//! applies each event it consumes exactly once, however often it arrives.
//! Services built on it can run a saga by choreography: each reacts to the
//! previous step's event and emits the next, or a compensation.
//!
//! # Concepts
//!
//! - An **event** is a protobuf message with a CloudEvents type and a NATS
//!   subject ([`Event`]). Each service publishes on its own stream,
//!   `<SERVICE>` on `<service>.>`.
//! - The **outbox** is a table in the service's own database. An event is
//!   written there in the transaction that changes the state it announces,
//!   and published once that commits ([`Outbox::append`],
//!   [`Outbox::publish`]). The **relay** deletes what JetStream
//!   acknowledged and publishes what a crash or an outage left behind.
//! - A **consumer** is a durable JetStream consumer shared by the service's
//!   replicas. It handles messages in batches, one transaction each, and
//!   records every event in the **inbox** in that transaction, so that a
//!   redelivery changes nothing. Its **router** maps each event type to a
//!   handler ([`Router`], [`Route`]).
//! - A message whose handler keeps failing, or that cannot be decoded, is
//!   a **dead letter**: it goes to a stream of its own with the reason,
//!   and an operator replays it to the consumer that gave up
//!   ([`dead_letters`]).
//!
//! # A service in a few lines
//!
//! [`Messaging::builder`] takes the NATS context, the pool and one
//! [`Config`], then the streams to consume with their routes, and returns
//! the running parts. It checks the database, provisions the streams, and
//! wires the outbox to its relay.
//!
//! ```no_run
//! use pg_jetstream::{Config, Context, Event, Handler, HandlerError, Messaging, Route, Router};
//!
//! #[derive(Clone, PartialEq, prost::Message)]
//! pub struct TicketBooked {
//!     #[prost(string, tag = "1")]
//!     pub ticket_id: String,
//! }
//!
//! impl Event for TicketBooked {
//!     const TYPE: &'static str = "travel.booking.v1.TicketBooked";
//!     const SUBJECT: &'static str = "booking.ticket_booked";
//! }
//!
//! #[derive(Clone)]
//! struct Invoices;
//!
//! impl Handler<TicketBooked> for Invoices {
//!     async fn handle(&self, cx: &mut Context<'_>, event: TicketBooked) -> Result<(), HandlerError> {
//!         diesel_async::RunQueryDsl::execute(
//!             diesel::sql_query("INSERT INTO invoices (ticket_id) VALUES ($1)")
//!                 .bind::<diesel::sql_types::Text, _>(&event.ticket_id),
//!             cx.conn(),
//!         )
//!         .await?;
//!         Ok(())
//!     }
//! }
//!
//! # async fn start() -> Result<(), Box<dyn std::error::Error>> {
//! let js = async_nats::jetstream::new(async_nats::connect("nats://127.0.0.1:4222").await?);
//! let url = "postgres://billing@127.0.0.1/billing";
//! pg_jetstream::db::migrate(url, vec![pg_jetstream::MIGRATIONS]).await?;
//! let pool = pg_jetstream::db::pool(url, 8)?;
//!
//! let messaging = Messaging::builder(js, pool, Config::new("billing"))
//!     .consume("BOOKING", Router::new().on::<TicketBooked>(Route::single()))
//!     .start(Invoices)
//!     .await?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! messaging.run(shutdown).await;
//! # Ok(())
//! # }
//! ```
//!
//! `examples/booking_saga.rs` is a whole saga of two services, each with
//! its own database, run by the crate's tests against real servers.
//!
//! # Emitting events
//!
//! Two ways, and in both the events that get published are exactly those
//! that were written:
//!
//! - **In a transaction.** A handler emits with [`Context::emit`] (or
//!   [`Batch::emit`](consumer::Batch::emit)); the consumer writes the events in the batch's
//!   transaction and publishes them after the commit. Outside a handler
//!   (an API call), [`Outbox::append`] writes them in your transaction and
//!   [`Outbox::publish`] sends what it returned once that has committed.
//! - **In one statement** ([`Route::in_one_statement`]): a handler reads
//!   without locks, decides, emits with [`Statement::emit`](consumer::Statement::emit) and writes
//!   once, in one statement that commits by itself and carries the inbox
//!   rows and the events ([`Statement::carry`](consumer::Statement::carry)): SQL functions
//!   `inbox_write` and `outbox_write` that the migrations create. What it
//!   read must still hold, or the statement raises a serialization failure
//!   and the events are decided again.
//!
//! # Guarantees
//!
//! - **Nothing written is lost.** An event is in the outbox once its
//!   transaction commits; what its writer could not publish (a crash, NATS
//!   away) the relay publishes after [`RelayConfig::sweep_after`](outbox::RelayConfig::sweep_after).
//! - **Nothing is applied twice.** Each event has an id (`ce-id`, also
//!   JetStream's `Nats-Msg-Id`, so a re-publish within the stream's
//!   duplicate window is stored once), and each consumer records the ids it
//!   applied in its inbox, in the same transaction as their effects.
//! - **A message is acknowledged only after** its batch committed and the
//!   events that batch emitted are in JetStream.
//! - **Nothing blocks the stream.** A message that fails for good is
//!   dead-lettered and terminated; the rest flow on.
//! - **Order is not promised** across subjects or after a retry: handlers
//!   must bear reordering (a saga step decides on the state it reads, and
//!   a compensation that overtakes its step leaves a mark the step finds).
//!
//! # Configuration
//!
//! Everything is in [`Config`], whose [`Config::new`] documents each
//! default: the stream and source names, [`provision::Names`] for the
//! dead-letter and replay streams, [`RetryPolicy`](consumer::RetryPolicy), batch size and
//! concurrency, inbox retention, ack wait, [`RelayConfig`](outbox::RelayConfig), stream
//! replicas and size, and whether the shared streams are provisioned.
//! Metrics have no prefix of their own: register them under yours
//! ([`MessagingMetrics::register`](telemetry::MessagingMetrics::register)).
//!
//! # Failure handling
//!
//! A handler returns a [`HandlerError`]: [`HandlerError::retryable`] (a
//! database error converts to it) is retried with a growing delay and
//! dead-lettered on the last attempt [`RetryPolicy`](consumer::RetryPolicy) allows;
//! [`HandlerError::permanent`] is dead-lettered at once. A batch whose
//! transaction failed for a reason that says nothing about its messages
//! (the database unreachable, a deadlock, a lock held elsewhere) is tried
//! again in place and spends no delivery. [`db::Failure`] tells these
//! apart, partly by the server's messages, so every pool of [`db::pool`]
//! makes its sessions speak English or refuses them.
//!
//! ```
//! use pg_jetstream::{Context, Event, Handler, HandlerError};
//! # #[derive(Clone, PartialEq, prost::Message)]
//! # pub struct SeatsRequested { #[prost(int32, tag = "1")] pub seats: i32 }
//! # impl Event for SeatsRequested {
//! #     const TYPE: &'static str = "travel.v1.SeatsRequested";
//! #     const SUBJECT: &'static str = "booking.seats_requested";
//! # }
//! struct Seats;
//!
//! impl Handler<SeatsRequested> for Seats {
//!     async fn handle(&self, _: &mut Context<'_>, event: SeatsRequested) -> Result<(), HandlerError> {
//!         if event.seats <= 0 {
//!             // No retry can mend this: to the dead-letter queue, with the reason.
//!             return Err(HandlerError::permanent(format!("{} seats", event.seats)));
//!         }
//!         Ok(())
//!     }
//! }
//! ```
//!
//! # The parts
//!
//! - [`envelope`]: the wire format, a protobuf body with CloudEvents
//!   binary-mode headers, trace context, correlation and causation ids.
//! - [`provision`]: idempotent create-or-update of the service's stream, its
//!   durable pull consumers and the shared streams.
//! - [`outbox`]: the outbox and the [`Relay`](outbox::Relay).
//! - [`consumer`]: the idempotent [`EventConsumer`](consumer::EventConsumer) loop: inbox, routing,
//!   retries with exponential backoff, dead letters.
//! - [`dead_letters`]: the operator's view of the dead letters: list,
//!   inspect, replay to the consumer that gave up, delete.
//! - [`telemetry`]: the relay's and the consumers' Prometheus metrics, and
//!   W3C trace context in and out of headers, outbox rows and tonic
//!   metadata.
//! - [`db`]: the PostgreSQL plumbing under all of it: pools with bounded
//!   sessions, migrations applied under a lock, statements kept prepared,
//!   and [`db::Failure`], what a failed statement means.
//!
//! Every long-running part is `run(self, shutdown)` and returns once the
//! shutdown token is cancelled and its in-flight work is done. Every service
//! database gets the outbox and inbox tables through [`MIGRATIONS`].

mod builder;
pub mod consumer;
pub mod db;
pub mod dead_letters;
pub mod envelope;
mod metrics;
pub mod outbox;
pub mod provision;
mod schema;
mod trace;

/// What the runtime tells of itself: Prometheus metrics
/// ([`MessagingMetrics`](telemetry::MessagingMetrics)) and W3C trace
/// context in and out of headers, outbox rows and tonic metadata.
pub mod telemetry {
    pub use crate::metrics::*;
    pub use crate::trace::*;
}

use diesel_migrations::{EmbeddedMigrations, embed_migrations};

pub use builder::{Config, Messaging, MessagingBuilder, StartError, Task};
pub use consumer::{Context, Handler, HandlerError, Route, Router};
pub use outbox::Outbox;

/// The outbox and inbox tables, from this crate's `migrations/`. Apply them
/// before the service's own migrations.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// A message that travels as an event: a protobuf message with its
/// CloudEvents type and the NATS subject it is published on.
///
/// Implement it for the types your `.proto` files generate, in the crate
/// that generates them:
///
/// ```
/// #[derive(Clone, PartialEq, prost::Message)]
/// pub struct TicketBooked {
///     #[prost(string, tag = "1")]
///     pub ticket_id: String,
/// }
///
/// impl pg_jetstream::Event for TicketBooked {
///     const TYPE: &'static str = "travel.booking.v1.TicketBooked";
///     const SUBJECT: &'static str = "ticket.booked";
/// }
/// ```
pub trait Event: prost::Message + Default + Send + Sync + 'static {
    /// The message's full protobuf name, sent as the CloudEvents `ce-type`.
    const TYPE: &'static str;
    /// The NATS subject the event is published on.
    const SUBJECT: &'static str;
}

/// A boxed future, as stored handlers return.
pub(crate) type BoxFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
