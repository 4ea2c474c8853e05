//! The transactional outbox: events written with the state change that
//! causes them, published right after the commit, swept up if not.
//!
//! A writer never publishes inside its transaction. It writes its change and
//! its events' rows together ([`Outbox::append`] inside its transaction, or
//! [`Outbox::write_in_statement`] inside a statement of its own), commits,
//! and then
//! hands the rows it wrote to [`Outbox::publish`]: they go to JetStream from
//! memory, in the order written, and the publisher waits for the acks.
//! Nothing reads the table on that path. Acknowledged rows are deleted by
//! the [`Relay`] in batches, many events a statement, off the hot path.
//!
//! What no writer confirmed — its process died after the commit, NATS was
//! down, the process has no publisher — the relay's periodic sweep
//! publishes once it is [`RelayConfig::sweep_after`] old, or at its next
//! look when a writer reports a failed publish. A row published
//! twice (a writer and the sweep racing, a crash after the publish) carries
//! the same `Nats-Msg-Id`, its row's id: JetStream drops the copy within its
//! duplicate window, and the consumers' inboxes drop it after.
//!
//! The table so holds only events not yet confirmed, and those confirmed a
//! moment ago that the relay has not deleted yet.

mod publish;
mod relay;

pub use publish::PublishError;
pub(crate) use publish::unconfirmed_caused_by;
pub use relay::{Relay, RelayConfig, RelayError, backlog};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::db::KeepPrepared;
use async_nats::jetstream;
use chrono::{DateTime, SubsecRound as _, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::envelope::OutgoingEvent;
use crate::metrics::MessagingMetrics;
use crate::schema::outbox;
use crate::trace::{self, TraceContext};
use publish::publish_rows;

/// Writes events into the outbox of the service named `source`, and, given a
/// JetStream context ([`Outbox::publishing_to`]), publishes them after the
/// writer's commit.
#[derive(Debug, Clone)]
pub struct Outbox {
    source: Arc<str>,
    js: Option<jetstream::Context>,
    metrics: MessagingMetrics,
    confirmed: Arc<Confirmed>,
}

/// The ids of rows that JetStream has acknowledged, for the relay to delete.
#[derive(Debug, Default)]
struct Confirmed {
    ids: Mutex<Vec<Uuid>>,
    /// Enough ids to fill one delete are waiting.
    full: Notify,
    /// A writer's publish failed since the relay last looked: its rows are
    /// to be swept at the next look, however young.
    failed: AtomicBool,
}

/// Confirmed ids held for the relay at most; past this (no relay runs, or it
/// cannot reach the database) the rows are left for the sweep, which
/// publishes them again harmlessly.
const CONFIRMED_HELD: usize = 100_000;

/// An outbox row: what a writer inserts and a publisher sends.
#[derive(Debug, Clone, Insertable, QueryableByName)]
#[diesel(table_name = outbox)]
pub(crate) struct Row {
    pub(crate) event_id: Uuid,
    pub(crate) subject: String,
    pub(crate) event_type: String,
    pub(crate) source: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) correlation_id: Option<String>,
    pub(crate) causation_id: Option<Uuid>,
    pub(crate) traceparent: Option<String>,
    pub(crate) tracestate: Option<String>,
    pub(crate) created_at: DateTime<Utc>,
}

/// Rows a writer has written, to hand to [`Outbox::publish`] once its
/// transaction has committed (and never if it rolled back).
#[derive(Debug, Default)]
#[must_use = "publish the rows once their transaction has committed"]
pub struct Written {
    rows: Vec<Row>,
}

impl Written {
    /// The events' ids, in the order written.
    pub fn ids(&self) -> Vec<Uuid> {
        self.rows.iter().map(|row| row.event_id).collect()
    }

    /// Adds `other`'s rows after these.
    pub fn extend(&mut self, other: Self) {
        self.rows.extend(other.rows);
    }

    /// No rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

impl Outbox {
    /// An outbox whose events carry `ce-source` = `source` (e.g.
    /// `travel/booking`). Without [`publishing_to`](Self::publishing_to), its
    /// rows wait for a relay's sweep.
    pub fn new(source: impl Into<Arc<str>>) -> Self {
        Self {
            source: source.into(),
            js: None,
            metrics: MessagingMetrics::default(),
            confirmed: Arc::default(),
        }
    }

    /// Publishes what its writers commit to `js`.
    #[must_use]
    pub fn publishing_to(mut self, js: jetstream::Context) -> Self {
        self.js = Some(js);
        self
    }

    /// Counts into `metrics` (the service's registered set).
    #[must_use]
    pub fn with_metrics(mut self, metrics: MessagingMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The `ce-source` of this outbox's events.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Writes `events` with the current span's trace context. Call it inside
    /// the transaction that makes the state change, and publish what it
    /// returns after the commit.
    pub async fn append(
        &self,
        conn: &mut AsyncPgConnection,
        events: Vec<OutgoingEvent>,
    ) -> QueryResult<Written> {
        self.append_each(conn, vec![(&tracing::Span::current(), events)])
            .await
    }

    /// Writes the events that several handled messages emitted, in one
    /// statement: each message's under a write span of its own, a child of
    /// that message's span, whose context the rows carry, so that every
    /// saga's trace goes on unbroken.
    pub(crate) async fn append_each(
        &self,
        conn: &mut AsyncPgConnection,
        emitted: Vec<(&tracing::Span, Vec<OutgoingEvent>)>,
    ) -> QueryResult<Written> {
        let written = self.rows_each(emitted);
        if written.rows.is_empty() {
            return Ok(written);
        }
        KeepPrepared(diesel::insert_into(outbox::table).values(&written.rows))
            .execute(conn)
            .await?;
        Ok(written)
    }

    /// The rows of the events that several handled messages emitted, each
    /// message's with the context of a write span of its own, a child of
    /// that message's span (see [`Outbox::append_each`]), for a statement
    /// to write.
    pub(crate) fn rows_each(&self, emitted: Vec<(&tracing::Span, Vec<OutgoingEvent>)>) -> Written {
        let mut rows = Vec::new();
        for (parent, events) in emitted {
            if events.is_empty() {
                continue;
            }
            let span = parent.in_scope(|| write_span(&self.source, &events));
            let context = span.in_scope(trace::current);
            rows.extend(self.rows(events, &context));
        }
        Written { rows }
    }

    fn rows(&self, events: Vec<OutgoingEvent>, context: &TraceContext) -> Vec<Row> {
        // As the table keeps it (microseconds), so that an event published
        // from memory and one swept from its row carry the same `ce-time`.
        let now = Utc::now().trunc_subsecs(6);
        events
            .into_iter()
            .map(|event| Row {
                event_id: Uuid::now_v7(),
                subject: event.subject.to_owned(),
                event_type: event.event_type.to_owned(),
                source: self.source.to_string(),
                payload: event.payload,
                correlation_id: event.correlation_id,
                causation_id: event.causation_id,
                traceparent: context.traceparent.clone(),
                tracestate: context.tracestate.clone(),
                created_at: now,
            })
            .collect()
    }

    /// Publishes rows whose transaction has committed, in the order written,
    /// and waits for JetStream's acks; the relay then forgets them. On an
    /// error the rows stay for the relay's sweep. Without a publisher this
    /// does nothing: the sweep takes them.
    pub async fn publish(&self, written: Written) -> Result<(), PublishError> {
        let Some(js) = &self.js else {
            return Ok(());
        };
        if written.rows.is_empty() {
            return Ok(());
        }
        if let Err(error) = publish_rows(js, &self.metrics, &written.rows).await {
            self.confirmed.failed.store(true, Ordering::Relaxed);
            return Err(error);
        }
        self.confirm(written.rows.iter().map(|row| row.event_id));
        Ok(())
    }

    /// Publishes rows whose transaction has committed without making the
    /// caller wait: for a use case that answers once its change is
    /// committed, whether or not the broker is reachable. A failure leaves
    /// the rows to the sweep.
    pub fn publish_in_background(&self, written: Written) {
        if self.js.is_none() || written.is_empty() {
            return;
        }
        let outbox = self.clone();
        tokio::spawn(async move {
            if let Err(error) = outbox.publish(written).await {
                tracing::debug!(%error, "publish after commit failed; the outbox sweep publishes the events");
            }
        });
    }

    /// Hands acknowledged ids to the relay, waking it once a delete's worth
    /// is waiting.
    fn confirm(&self, ids: impl Iterator<Item = Uuid>) {
        let mut held = self
            .confirmed
            .ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let room = CONFIRMED_HELD.saturating_sub(held.len());
        held.extend(ids.take(room));
        if held.len() >= relay::FORGET_BATCH {
            self.confirmed.full.notify_one();
        }
    }

    /// Whether a writer's publish failed since the last time this was asked.
    fn publish_failed(&self) -> bool {
        self.confirmed.failed.swap(false, Ordering::Relaxed)
    }

    /// The confirmed ids handed over so far, now the caller's to delete.
    fn take_confirmed(&self) -> Vec<Uuid> {
        std::mem::take(
            &mut *self
                .confirmed
                .ids
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// Events that a statement of the caller's own writes with its change, so
/// that the change and its events take one round trip and one implicit
/// transaction instead of `BEGIN`, a statement each and `COMMIT` (see
/// [`Outbox::write_in_statement`]).
///
/// The statement passes [`OutboxWrite::json`] to the `outbox_write`
/// function (see the messaging migrations), called from the common table
/// expression that returns a row when the change was made: no change, no
/// events. The outbox's columns stay this crate's business:
///
/// ```sql
/// WITH placed AS (INSERT INTO orders ... RETURNING order_id),
///      events AS (SELECT outbox_write($8::jsonb) FROM placed)
/// SELECT EXISTS (SELECT FROM placed), (SELECT count(*) FROM events)
/// ```
pub struct OutboxWrite {
    span: tracing::Span,
    rows: Vec<Row>,
}

impl std::fmt::Debug for OutboxWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxWrite")
            .field("events", &self.rows.len())
            .finish_non_exhaustive()
    }
}

impl Outbox {
    /// `events`, for a statement of the caller's own to write. The rows
    /// carry the context of an outbox-write span, a child of the current
    /// span: run the statement in [`OutboxWrite::span`], and publish
    /// [`OutboxWrite::written`] once it has committed having made its
    /// change.
    pub fn write_in_statement(&self, events: Vec<OutgoingEvent>) -> OutboxWrite {
        let span = write_span(&self.source, &events);
        let context = span.in_scope(trace::current);
        OutboxWrite {
            span,
            rows: self.rows(events, &context),
        }
    }
}

impl OutboxWrite {
    /// The outbox-write span whose context the rows carry.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// The rows the statement writes when it makes its change.
    pub fn written(&self) -> Written {
        Written {
            rows: self.rows.clone(),
        }
    }

    /// The rows as the `outbox_write` function takes them: a JSON array of
    /// objects, one per event in the order written, the payload in hex.
    pub fn json(&self) -> String {
        json(&self.rows)
    }
}

impl Written {
    /// The rows as the `outbox_write` function takes them (see
    /// [`OutboxWrite::json`]).
    pub(crate) fn json(&self) -> String {
        json(&self.rows)
    }
}

fn json(rows: &[Row]) -> String {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|row| {
            serde_json::json!({
                "event_id": row.event_id.to_string(),
                "subject": row.subject,
                "event_type": row.event_type,
                "source": row.source,
                "payload": hex(&row.payload),
                "correlation_id": row.correlation_id,
                "causation_id": row.causation_id.map(|id| id.to_string()),
                "traceparent": row.traceparent,
                "tracestate": row.tracestate,
                "created_at": row.created_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            })
        })
        .collect();
    serde_json::Value::Array(rows).to_string()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut text, byte| {
            let _ = write!(text, "{byte:02x}");
            text
        })
}

/// The span of one outbox write; the written rows carry its context.
fn write_span(source: &str, events: &[OutgoingEvent]) -> tracing::Span {
    let subjects: Vec<&str> = events.iter().map(|event| event.subject).collect();
    tracing::info_span!(
        "outbox write",
        otel.kind = "internal",
        pg_jetstream.service = crate::trace::service_of(source),
        messaging.system = "nats",
        messaging.destination.name = %subjects.join(" "),
        messaging.batch.message_count = events.len(),
        order_id = <[_]>::first(events)
            .and_then(|event| event.correlation_id.as_deref())
            .unwrap_or_default(),
    )
}
