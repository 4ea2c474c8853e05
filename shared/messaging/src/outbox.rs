//! The transactional outbox and its relay.
//!
//! A use case never publishes: it calls [`Outbox::append`] inside the same
//! database transaction as its state change, so the change and its events
//! commit or vanish together. The [`Relay`] then claims pending rows and
//! marks them published in one statement, publishes them in insertion order,
//! waits for JetStream's acks, and only then commits the marks; a failed
//! publish rolls them back. A crash between publish and commit publishes the
//! rows again on restart; JetStream drops the copies because `Nats-Msg-Id`
//! is the row's id.
//!
//! Replicas relay side by side: each batch is claimed with
//! `FOR UPDATE SKIP LOCKED`. A writer in the relay's own process wakes it
//! after its commit ([`Outbox::committed`], [`Relay::woken_by`]): no poll, no
//! round trip through the database. For writers elsewhere, an idle relay
//! also sleeps on `LISTEN outbox`; a trigger notifies when events arrive in
//! an empty outbox (not on every insert: a NOTIFY serialises commits), and
//! not for writers whose sessions say they wake their own relay
//! ([`WAKES_OWN_RELAY`]). A
//! relay may keep polling briefly after a batch (`linger`, off by default).
//! A slow poll is the backstop for everything else (a writer that did not
//! report, a notification lost with a dropped connection).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{
    AsyncConnection as _, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection as _,
};
use futures::StreamExt as _;
use shop_db::{Cached, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::envelope::{OutgoingEvent, build_headers};
use crate::metrics::{MessagingMetrics, SubjectLabels};
use crate::schema::outbox;
use crate::trace::{self, TraceContext};

/// The session setting of a writer that wakes its own process's relay
/// ([`Outbox::committed`]): the outbox trigger sends such a writer's commits
/// no notification, which would only wake the relay again for rows it is
/// already publishing (and cost the commit the notification queue's lock).
/// Give it to the pool the writers use (`shop_db::with_settings`), never to
/// one whose writers have no relay in their process.
pub const WAKES_OWN_RELAY: (&str, &str) = ("shop.wakes_own_relay", "on");

/// Writes events into the outbox of the service named `source`.
#[derive(Debug, Clone)]
pub struct Outbox {
    source: Arc<str>,
    committed: Arc<Commits>,
}

/// The commits an [`Outbox`]'s writers report to the relay woken by it.
#[derive(Debug, Default)]
struct Commits {
    /// How many, ever: a relay that began its last claim after the latest
    /// one has nothing new to look for.
    count: AtomicU64,
    wake: Notify,
}

#[derive(Insertable)]
#[diesel(table_name = outbox)]
struct NewOutboxRow<'a> {
    event_id: Uuid,
    subject: &'a str,
    event_type: &'a str,
    source: &'a str,
    payload: &'a [u8],
    correlation_id: Option<&'a str>,
    causation_id: Option<Uuid>,
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
    created_at: DateTime<Utc>,
}

impl Outbox {
    /// An outbox whose events carry `ce-source` = `source` (e.g. `shop/order`).
    pub fn new(source: impl Into<Arc<str>>) -> Self {
        Self {
            source: source.into(),
            committed: Arc::default(),
        }
    }

    /// Tells the relay woken by this outbox ([`Relay::woken_by`]) that rows
    /// appended through it have committed, so that it publishes them at once
    /// instead of at its next look. Call it after the commit: before, the
    /// relay would find nothing. A missed call costs only that wait.
    pub fn committed(&self) {
        self.committed.count.fetch_add(1, Ordering::SeqCst);
        self.committed.wake.notify_one();
    }

    /// The `ce-source` of this outbox's events.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Writes `events` with the current span's trace context. Call it inside
    /// the transaction that makes the state change; returns the event ids.
    pub async fn append(
        &self,
        conn: &mut AsyncPgConnection,
        events: &[OutgoingEvent],
    ) -> QueryResult<Vec<Uuid>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        // The rows carry this span's context: each publish is its child.
        let span = write_span(&self.source, events);
        let context = span.in_scope(trace::current);
        let rows: Vec<_> = events.iter().map(|event| (event, &context)).collect();
        self.insert(conn, &rows).instrument(span).await
    }

    /// Writes the events that several handled messages emitted, in one
    /// statement: each message's under a write span of its own, a child of
    /// that message's span, so that every saga's trace goes on unbroken.
    pub(crate) async fn append_each(
        &self,
        conn: &mut AsyncPgConnection,
        emitted: &[(&tracing::Span, Vec<OutgoingEvent>)],
    ) -> QueryResult<()> {
        let writes: Vec<(tracing::Span, TraceContext, &[OutgoingEvent])> = emitted
            .iter()
            .filter(|(_, events)| !events.is_empty())
            .map(|(parent, events)| {
                let span = parent.in_scope(|| write_span(&self.source, events));
                let context = span.in_scope(trace::current);
                (span, context, events.as_slice())
            })
            .collect();
        if writes.is_empty() {
            return Ok(());
        }
        let rows: Vec<_> = writes
            .iter()
            .flat_map(|(_, context, events)| events.iter().map(move |event| (event, context)))
            .collect();
        self.insert(conn, &rows).await?;
        Ok(())
    }

    async fn insert(
        &self,
        conn: &mut AsyncPgConnection,
        events: &[(&OutgoingEvent, &TraceContext)],
    ) -> QueryResult<Vec<Uuid>> {
        let now = Utc::now();
        let ids: Vec<Uuid> = events.iter().map(|_| Uuid::now_v7()).collect();
        let rows: Vec<NewOutboxRow<'_>> = events
            .iter()
            .zip(&ids)
            .map(|((event, context), &event_id)| NewOutboxRow {
                event_id,
                subject: event.subject,
                event_type: event.event_type,
                source: &self.source,
                payload: &event.payload,
                correlation_id: event.correlation_id.as_deref(),
                causation_id: event.causation_id,
                traceparent: context.traceparent.as_deref(),
                tracestate: context.tracestate.as_deref(),
                created_at: now,
            })
            .collect();
        Cached(diesel::insert_into(outbox::table).values(&rows))
            .execute(conn)
            .await?;
        Ok(ids)
    }
}

/// Events that a statement of the caller's own writes, so that a change and
/// its events take one round trip and one implicit transaction instead of
/// `BEGIN`, a statement each and `COMMIT` (see [`Outbox::write_when`]).
///
/// It renders as `INSERT INTO outbox ... SELECT ... WHERE EXISTS (SELECT
/// FROM guard)`, for the caller's `WITH` list, where `guard` names one of
/// the statement's common table expressions that returns a row when the
/// change was made: no change, no events.
pub struct OutboxWrite {
    span: tracing::Span,
    guard: &'static str,
    source: Arc<str>,
    context: TraceContext,
    created_at: DateTime<Utc>,
    rows: Vec<(Uuid, OutgoingEvent)>,
}

impl std::fmt::Debug for OutboxWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxWrite")
            .field("guard", &self.guard)
            .field("events", &self.rows.len())
            .finish_non_exhaustive()
    }
}

impl Outbox {
    /// `events`, for a statement of the caller's own to write if its common
    /// table expression `guard` returns a row. The rows carry the context of
    /// an outbox-write span, a child of the current span: run the statement
    /// in [`OutboxWrite::span`].
    pub fn write_when(&self, guard: &'static str, events: Vec<OutgoingEvent>) -> OutboxWrite {
        let span = write_span(&self.source, &events);
        let context = span.in_scope(trace::current);
        OutboxWrite {
            span,
            guard,
            source: Arc::clone(&self.source),
            context,
            created_at: Utc::now(),
            rows: events
                .into_iter()
                .map(|event| (Uuid::now_v7(), event))
                .collect(),
        }
    }
}

impl OutboxWrite {
    /// The outbox-write span whose context the rows carry.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }
}

impl diesel::query_builder::QueryFragment<diesel::pg::Pg> for OutboxWrite {
    fn walk_ast<'b>(
        &'b self,
        mut pass: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
    ) -> QueryResult<()> {
        use diesel::sql_types::{Bytea, Nullable, Text, Timestamptz, Uuid as SqlUuid};
        pass.push_sql(
            "INSERT INTO outbox (event_id, subject, event_type, source, payload, \
             correlation_id, causation_id, traceparent, tracestate, created_at) ",
        );
        if self.rows.is_empty() {
            pass.push_sql(
                "SELECT event_id, subject, event_type, source, payload, correlation_id, \
                 causation_id, traceparent, tracestate, created_at FROM outbox WHERE false",
            );
            return Ok(());
        }
        pass.push_sql("SELECT written.* FROM (VALUES ");
        for (index, (event_id, event)) in self.rows.iter().enumerate() {
            pass.push_sql(if index == 0 { "(" } else { ", (" });
            pass.push_bind_param::<SqlUuid, _>(event_id)?;
            pass.push_sql(", ");
            pass.push_bind_param::<Text, _>(&event.subject)?;
            pass.push_sql(", ");
            pass.push_bind_param::<Text, _>(&event.event_type)?;
            pass.push_sql(", ");
            pass.push_bind_param::<Text, _>(&*self.source)?;
            pass.push_sql(", ");
            pass.push_bind_param::<Bytea, _>(&event.payload)?;
            pass.push_sql(", ");
            pass.push_bind_param::<Nullable<Text>, _>(&event.correlation_id)?;
            pass.push_sql(", ");
            pass.push_bind_param::<Nullable<SqlUuid>, _>(&event.causation_id)?;
            pass.push_sql(", ");
            pass.push_bind_param::<Nullable<Text>, _>(&self.context.traceparent)?;
            pass.push_sql(", ");
            pass.push_bind_param::<Nullable<Text>, _>(&self.context.tracestate)?;
            pass.push_sql(", ");
            pass.push_bind_param::<Timestamptz, _>(&self.created_at)?;
            pass.push_sql(")");
        }
        pass.push_sql(") AS written WHERE EXISTS (SELECT FROM ");
        pass.push_identifier(self.guard)?;
        pass.push_sql(")");
        Ok(())
    }
}

/// The span of one outbox write; the written rows carry its context.
fn write_span(source: &str, events: &[OutgoingEvent]) -> tracing::Span {
    let subjects: Vec<&str> = events.iter().map(|event| event.subject).collect();
    tracing::info_span!(
        "outbox write",
        otel.kind = "internal",
        shop.service = crate::trace::service_of(source),
        messaging.system = "nats",
        messaging.destination.name = %subjects.join(" "),
        messaging.batch.message_count = events.len(),
        order_id = <[_]>::first(events)
            .and_then(|event| event.correlation_id.as_deref())
            .unwrap_or_default(),
    )
}

/// How the relay batches, waits and cleans up.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Rows claimed, published and marked per transaction.
    pub batch_size: i64,
    /// How long an idle relay waits for a notification before looking
    /// anyway while its LISTEN connection is up: a backstop, since every
    /// commit notifies and a LISTEN connection that comes back wakes the
    /// relay to look.
    pub poll_interval: Duration,
    /// The same while the LISTEN connection is down (no notification can
    /// come): the relay's only way to notice rows other processes commit.
    pub poll_unlistened: Duration,
    /// After a batch, how long the relay keeps looking every `linger_poll`
    /// before it goes idle (default zero: writers in the relay's process
    /// wake it, see [`Relay::woken_by`]; lingering catches busy writers
    /// elsewhere sooner than the poll).
    pub linger: Duration,
    /// The interval of those looks.
    pub linger_poll: Duration,
    /// How long published rows are kept (for inspection) before deletion.
    pub retention: Duration,
    /// How often published rows older than `retention` are deleted.
    pub cleanup_interval: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            poll_interval: Duration::from_secs(10),
            poll_unlistened: Duration::from_secs(1),
            linger: Duration::ZERO,
            linger_poll: Duration::from_millis(5),
            retention: Duration::from_secs(3600),
            cleanup_interval: Duration::from_secs(60),
        }
    }
}

/// Why a relay batch failed. The batch's transaction rolled back, so its
/// rows stay pending and are published by a later batch.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A query failed.
    #[error("outbox query failed: {0}")]
    Database(#[from] diesel::result::Error),
    /// No connection could be had.
    #[error("no database connection: {0}")]
    Pool(String),
    /// JetStream did not take or did not acknowledge a message.
    #[error("publish to JetStream failed: {0}")]
    Publish(#[from] jetstream::context::PublishError),
}

/// Publishes the outbox's pending rows to JetStream.
pub struct Relay {
    pool: PgPool,
    database_url: String,
    js: jetstream::Context,
    config: RelayConfig,
    published: Arc<AtomicU64>,
    metrics: MessagingMetrics,
    /// The writers in this process, when they report their commits.
    writers: Option<Arc<Commits>>,
}

/// What woke an idle relay, and so what it does next.
enum Look {
    /// Ask cheaply whether anything is pending first (a poll, a
    /// notification from the database).
    Ask,
    /// Claim straight away: a writer committed rows since the last claim
    /// began, or the last batch was full.
    Claim,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[derive(QueryableByName)]
#[diesel(table_name = outbox)]
struct PendingRow {
    event_id: Uuid,
    seq: i64,
    subject: String,
    event_type: String,
    source: String,
    payload: Vec<u8>,
    correlation_id: Option<String>,
    causation_id: Option<Uuid>,
    traceparent: Option<String>,
    tracestate: Option<String>,
    created_at: DateTime<Utc>,
}

const CHANNEL: &str = "outbox";

/// How long a stopping relay spends publishing what is left.
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Claims the oldest pending rows that no other relay holds and marks them,
/// in one statement; the marks commit with the batch.
const CLAIM: &str = "UPDATE outbox SET published_at = now() \
    WHERE event_id IN (SELECT event_id FROM outbox WHERE published_at IS NULL \
    ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED) \
    RETURNING event_id, seq, subject, event_type, source, payload, correlation_id, \
    causation_id, traceparent, tracestate, created_at";

impl Relay {
    /// A relay for the outbox in `pool`'s database; `database_url` is used
    /// for the `LISTEN` connection, which a pool cannot hold.
    pub fn new(
        pool: PgPool,
        database_url: impl Into<String>,
        js: jetstream::Context,
        config: RelayConfig,
    ) -> Self {
        Self {
            pool,
            database_url: database_url.into(),
            js,
            config,
            published: Arc::default(),
            metrics: MessagingMetrics::default(),
            writers: None,
        }
    }

    /// Wakes the relay whenever `outbox` reports a commit
    /// ([`Outbox::committed`]): events written in this process go out without
    /// waiting for a poll or a notification.
    #[must_use]
    pub fn woken_by(mut self, outbox: &Outbox) -> Self {
        self.writers = Some(Arc::clone(&outbox.committed));
        self
    }

    /// Counts into `metrics` (the service's registered set).
    #[must_use]
    pub fn with_metrics(mut self, metrics: MessagingMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// How many rows wait to be published, and how long the oldest has
    /// waited; also sets the backlog gauges.
    pub async fn backlog(&self) -> Result<(i64, Duration), RelayError> {
        let mut conn = self
            .pool
            .get()
            .await
            .map_err(|error| RelayError::Pool(error.to_string()))?;
        let (pending, oldest): (i64, Option<DateTime<Utc>>) = outbox::table
            .filter(outbox::published_at.is_null())
            .select((
                diesel::dsl::count_star(),
                diesel::dsl::min(outbox::created_at),
            ))
            .get_result(&mut conn)
            .await?;
        let lag = oldest
            .and_then(|oldest| (Utc::now() - oldest).to_std().ok())
            .unwrap_or_default();
        self.metrics.outbox_pending.set(pending);
        self.metrics.outbox_lag.set(lag.as_secs_f64());
        Ok((pending, lag))
    }

    /// A counter of the rows this relay has published (and marked).
    pub fn published_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.published)
    }

    /// Publishes pending rows until none is left or shutdown is requested.
    pub async fn run(self, shutdown: CancellationToken) {
        // Notifications from the database: writers elsewhere.
        let notified = Arc::new(Notify::new());
        let listening = Arc::new(AtomicBool::new(false));
        let listener = tokio::spawn(listen(
            self.database_url.clone(),
            Arc::clone(&notified),
            Arc::clone(&listening),
            shutdown.clone(),
        ));
        let mut next_cleanup = tokio::time::Instant::now();
        let mut last_batch = tokio::time::Instant::now();
        let mut failures = 0u32;
        let mut look = Look::Ask;
        while !shutdown.is_cancelled() {
            // Every commit reported before this claims with it: a wake-up
            // for those alone finds nothing new.
            let claimed_after = self.commits_reported();
            let result = self.claim_and_publish(matches!(look, Look::Ask)).await;
            // After a full batch more rows are waiting: claim straight away.
            look = match result {
                Ok(count) if count as i64 == self.config.batch_size => Look::Claim,
                _ => Look::Ask,
            };
            match result {
                // A full batch: more may be waiting.
                Ok(count) if count as i64 == self.config.batch_size => {
                    failures = 0;
                    last_batch = tokio::time::Instant::now();
                    continue;
                }
                Ok(count) => {
                    failures = 0;
                    if count > 0 {
                        last_batch = tokio::time::Instant::now();
                    }
                }
                Err(error) => {
                    failures += 1;
                    tracing::warn!(error = %error, failures, "outbox relay batch failed; retrying");
                    let delay = backoff(failures);
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(delay) => continue,
                    }
                }
            }
            if tokio::time::Instant::now() >= next_cleanup {
                match self.delete_published().await {
                    Ok(deleted) if deleted > 0 => {
                        tracing::debug!(deleted, "published outbox rows deleted")
                    }
                    Ok(_) => {}
                    Err(error) => tracing::warn!(error = %error, "outbox clean-up failed"),
                }
                next_cleanup = tokio::time::Instant::now() + self.config.cleanup_interval;
            }
            // Busy a moment ago: look again soon. Idle: sleep until notified,
            // looking now and then in case a notification went astray, or
            // often while none can come.
            let wait = if last_batch.elapsed() < self.config.linger {
                self.config.linger_poll
            } else if AtomicBool::load(&listening, Ordering::Relaxed) {
                self.config.poll_interval
            } else {
                self.config.poll_unlistened.min(self.config.poll_interval)
            };
            let idle_until = tokio::time::Instant::now() + wait;
            look = loop {
                let reported = async {
                    match &self.writers {
                        Some(writers) => writers.wake.notified().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = shutdown.cancelled() => break Look::Ask,
                    // A writer here committed rows; unless the last claim
                    // already took them (it began after the commit: several
                    // commits while a batch ran leave one wake-up behind),
                    // claim without asking.
                    () = reported => if self.commits_reported() != claimed_after {
                        break Look::Claim;
                    },
                    // A writer elsewhere, or a poll: many find their rows
                    // claimed already, and asking costs one statement where
                    // an empty claim costs a transaction.
                    () = notified.notified() => break Look::Ask,
                    () = tokio::time::sleep_until(idle_until) => break Look::Ask,
                }
            };
        }
        // What is committed goes out before the relay does, so that a
        // stopped service leaves no event waiting for its next start; a
        // broker that does not answer in time leaves them for it.
        if tokio::time::timeout(DRAIN_TIME, self.drain())
            .await
            .is_err()
        {
            tracing::warn!("outbox not drained at shutdown; the rest goes out at the next start");
        }
        let _ = listener.await;
    }

    /// How many commits the writers in this process have reported so far.
    fn commits_reported(&self) -> u64 {
        self.writers.as_ref().map_or(0, |writers| {
            AtomicU64::load(&writers.count, Ordering::SeqCst)
        })
    }

    /// Publishes batches until a batch comes back short or fails.
    async fn drain(&self) {
        loop {
            match self.claim_and_publish(true).await {
                Ok(count) if count as i64 == self.config.batch_size => {}
                Ok(_) => return,
                Err(error) => {
                    tracing::warn!(error = %error, "outbox drain at shutdown failed; the rest goes out at the next start");
                    return;
                }
            }
        }
    }

    /// Claims, publishes and marks one batch of pending rows; returns how
    /// many. Holding the row locks until the marks commit keeps other relays
    /// off these rows.
    pub async fn relay_batch(&self) -> Result<usize, RelayError> {
        self.claim_and_publish(true).await
    }

    /// One batch; `look_first` asks first, cheaply, whether anything is
    /// pending (a lingering relay asks often, and most answers are no).
    async fn claim_and_publish(&self, look_first: bool) -> Result<usize, RelayError> {
        let mut conn = self
            .pool
            .get()
            .await
            .map_err(|error| RelayError::Pool(error.to_string()))?;
        if look_first {
            let pending: bool = diesel::select(diesel::dsl::exists(
                outbox::table.filter(outbox::published_at.is_null()),
            ))
            .get_result(&mut conn)
            .await?;
            if !pending {
                return Ok(0);
            }
        }
        let count = conn
            .transaction::<_, RelayError, _>(async move |conn| {
                // Claimed and marked in one statement; the marks commit only
                // once JetStream has acknowledged every row, and roll back
                // if it has not.
                let mut rows: Vec<PendingRow> = Cached(
                    diesel::sql_query(CLAIM)
                        .bind::<diesel::sql_types::BigInt, _>(self.config.batch_size),
                )
                .load(conn)
                .await?;
                if rows.is_empty() {
                    return Ok(0);
                }
                rows.sort_unstable_by_key(|row| row.seq);
                // Send every message first, then wait for the acks: one
                // round trip per batch instead of one per row.
                let mut acks = Vec::with_capacity(rows.len());
                for row in &rows {
                    acks.push(self.publish(row).await?);
                }
                for ack in acks {
                    ack.await?;
                }
                for row in &rows {
                    self.metrics
                        .published
                        .get_or_create(&SubjectLabels {
                            subject: row.subject.clone(),
                        })
                        .inc();
                }
                Ok(rows.len())
            })
            .await?;
        self.published.fetch_add(count as u64, Ordering::Relaxed);
        Ok(count)
    }

    async fn publish(
        &self,
        row: &PendingRow,
    ) -> Result<jetstream::context::PublishAckFuture, RelayError> {
        let span = tracing::info_span!(
            "publish",
            otel.name = format!("{} publish", row.subject),
            otel.kind = "producer",
            shop.service = crate::trace::service_of(&row.source),
            messaging.system = "nats",
            messaging.operation.type = "publish",
            messaging.destination.name = %row.subject,
            messaging.message.id = %row.event_id,
            order_id = row.correlation_id.as_deref().unwrap_or_default(),
            trace_id = tracing::field::Empty,
        );
        trace::continue_from(&span, row.traceparent.as_deref(), row.tracestate.as_deref());
        span.record("trace_id", trace::trace_id(&span));
        // The consumer continues the publish span when tracing is exported;
        // otherwise the writer's context passes through unchanged.
        let context = span.in_scope(trace::current);
        let headers = build_headers(
            row.event_id,
            &row.event_type,
            &row.source,
            row.created_at,
            row.correlation_id.as_deref(),
            row.causation_id,
            context
                .traceparent
                .as_deref()
                .or(row.traceparent.as_deref()),
            context.tracestate.as_deref().or(row.tracestate.as_deref()),
        );
        let message = PublishMessage::build()
            .payload(row.payload.clone().into())
            .headers(headers);
        Ok(self
            .js
            .send_publish(row.subject.clone(), message)
            .instrument(span)
            .await?)
    }

    async fn delete_published(&self) -> Result<usize, RelayError> {
        let cutoff = Utc::now() - self.config.retention;
        let mut conn = self
            .pool
            .get()
            .await
            .map_err(|error| RelayError::Pool(error.to_string()))?;
        Ok(
            diesel::delete(outbox::table.filter(outbox::published_at.lt(cutoff)))
                .execute(&mut conn)
                .await?,
        )
    }
}

/// Forwards `NOTIFY outbox` to `wake`, reconnecting when the connection drops.
async fn listen(
    database_url: String,
    wake: Arc<Notify>,
    listening: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        let result = async {
            let mut conn = AsyncPgConnection::establish(&database_url).await?;
            conn.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
            listening.store(true, Ordering::Relaxed);
            // Rows written while no one listened are picked up by this wake.
            wake.notify_one();
            let mut notifications = std::pin::pin!(conn.notifications_stream());
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return Ok::<_, Box<dyn std::error::Error + Send + Sync>>(()),
                    notification = notifications.next() => match notification {
                        Some(Ok(_)) => wake.notify_one(),
                        Some(Err(error)) => return Err(error.into()),
                        None => return Err("the LISTEN connection closed".into()),
                    },
                }
            }
        }
        .await;
        listening.store(false, Ordering::Relaxed);
        match result {
            Ok(()) => return,
            Err(error) => {
                failures += 1;
                tracing::warn!(error = %error, "outbox LISTEN connection lost; polling until it is back");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff(failures)) => {}
                }
            }
        }
    }
}

/// 100 ms doubling up to 5 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(6).saturating_sub(1)))
        .min(Duration::from_secs(5))
}
