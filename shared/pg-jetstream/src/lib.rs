//! Transactional messaging between PostgreSQL and NATS JetStream, so that
//! no service loses, duplicates or blocks on an event: a service writes its
//! events in the same transaction (or the same statement) as its state, and
//! applies each event it consumes exactly once, however often it arrives.
//!
//! - [`Event`]: what a message type must say of itself, its CloudEvents type
//!   and its subject; implement it for your generated protobuf types.
//! - [`envelope`]: the wire format, a protobuf body with CloudEvents
//!   binary-mode headers, trace context, correlation and causation ids.
//! - [`provision`]: idempotent create-or-update of the service's stream, its
//!   durable pull consumers and the `DLQ` stream.
//! - [`outbox`]: [`Outbox::append`] writes events inside the caller's
//!   transaction, [`Outbox::write_in_statement`] inside the caller's own
//!   statement;
//!   [`Outbox::publish`] sends them once it has committed; the [`Relay`]
//!   deletes what JetStream acknowledged and sweeps up what nobody did.
//! - [`consumer`]: the idempotent [`EventConsumer`] loop: inbox, a routing
//!   table from `ce-type` to handler, retries with exponential backoff, dead
//!   letters.
//! - [`dead_letters`]: the operator's view of the `DLQ` stream: list,
//!   inspect, replay to the consumer that gave up, delete.
//! - [`metrics`]: the relay's and the consumers' Prometheus metrics.
//! - [`trace`]: W3C trace context in and out of headers, outbox rows and
//!   tonic metadata.
//! - [`db`]: the PostgreSQL plumbing under all of it: pools with bounded
//!   sessions, migrations applied under a lock, statements kept prepared,
//!   and [`db::Failure`], what a failed statement means.
//!
//! Every long-running task is `run(self, shutdown)` and returns once the
//! shutdown token is cancelled and its in-flight work is done. Every service
//! database gets the outbox and inbox tables through [`MIGRATIONS`].

pub mod consumer;
pub mod db;
pub mod dead_letters;
pub mod envelope;
pub mod metrics;
pub mod outbox;
pub mod provision;
mod schema;
pub mod trace;

use diesel_migrations::{EmbeddedMigrations, embed_migrations};

pub use consumer::{
    Batch, BatchHandler, Carried, Context, EventConsumer, Handler, HandlerError, LockNames,
    Processed, ProcessedHook, RetryPolicy, Route, Router, Statement, StatementHandler,
};
pub use dead_letters::{DeadLetter, DeadLetterError, DeadLetterPage, DeadLetters};
pub use envelope::{Envelope, EnvelopeError, OutgoingEvent};
pub use metrics::MessagingMetrics;
pub use outbox::{Outbox, OutboxWrite, PublishError, Relay, RelayConfig, Written};
pub use provision::{ConsumerSpec, StreamSpec, replay_subject};

/// The outbox and inbox tables, from this crate's `migrations/`. Apply them
/// before the service's own migrations.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// The servers of a NATS URL list, `nats://a:4222,nats://b:4222` as
/// `NATS_URL` takes them: a client given every node of a cluster goes to
/// another when its own is lost, even one it has never heard of from the
/// cluster (at start-up, say).
pub fn nats_servers(urls: &str) -> std::io::Result<Vec<async_nats::ServerAddr>> {
    let servers = urls
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(str::parse)
        .collect::<std::io::Result<Vec<async_nats::ServerAddr>>>()?;
    if servers.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "no NATS server URL",
        ));
    }
    Ok(servers)
}

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
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

#[cfg(test)]
mod tests {
    #[test]
    fn a_nats_url_list_gives_every_server() {
        let servers =
            super::nats_servers("nats://127.0.0.1:4222, nats://10.0.0.2:4223,tls://n3:4222")
                .unwrap();
        let hosts: Vec<(String, u16)> = servers
            .iter()
            .map(|server| (server.host().to_owned(), server.port()))
            .collect();
        assert_eq!(
            hosts,
            [
                ("127.0.0.1".to_owned(), 4222),
                ("10.0.0.2".to_owned(), 4223),
                ("n3".to_owned(), 4222)
            ]
        );
        assert!(super::nats_servers("").is_err());
        assert!(super::nats_servers(" , ").is_err());
        assert!(super::nats_servers("nats://a:4222,http://b").is_err());
    }
}
