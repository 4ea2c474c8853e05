//! The relay: the outbox's housekeeper and backstop. It deletes the rows
//! writers have confirmed, many a statement, and sweeps up the rows nobody
//! confirmed once they are [`RelayConfig::sweep_after`] old (all of them,
//! however young, after a writer's publish failed): claimed with
//! `FOR UPDATE SKIP LOCKED` (replicas sweep side by side), published, and
//! deleted in the same transaction once JetStream has acknowledged them.
//! It wakes on its timer, or when writers have confirmed a delete's worth.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::db::{KeepPrepared, PgPool};
use async_nats::jetstream;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Double, Uuid as SqlUuid};
use diesel_async::{AsyncConnection as _, RunQueryDsl};
use tokio_util::sync::CancellationToken;

use super::publish::publish_rows;
use super::{Outbox, PublishError, Row};
use crate::metrics::MessagingMetrics;

/// Confirmed ids that wake the relay to delete them before its timer does.
pub(super) const FORGET_BATCH: usize = 1000;

/// How long a stopping relay spends publishing what is left.
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Deletes confirmed rows, skipping those a sweep holds (it deletes them).
const FORGET: &str = "DELETE FROM outbox WHERE event_id IN \
    (SELECT event_id FROM outbox WHERE event_id = ANY($1) FOR UPDATE SKIP LOCKED)";

/// Takes the oldest unconfirmed rows stored at least `$2` seconds ago, by
/// the database's clock, that no other relay holds; they are gone once the
/// transaction commits, and back if it rolls back.
const SWEEP: &str = "WITH taken AS (DELETE FROM outbox WHERE event_id IN \
    (SELECT event_id FROM outbox WHERE stored_at <= now() - make_interval(secs => $2) \
    ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED) RETURNING *) \
    SELECT event_id, subject, event_type, source, payload, correlation_id, \
    causation_id, traceparent, tracestate, created_at FROM taken ORDER BY seq";

/// Whether the oldest row (the first by `seq`) was stored at least `$1`
/// seconds ago; no row when the outbox is empty.
const OLDEST_DUE: &str = "SELECT stored_at <= now() - make_interval(secs => $1) AS due \
    FROM outbox ORDER BY seq LIMIT 1";

const BACKLOG: &str = "SELECT count(*) AS rows, \
    coalesce(extract(epoch FROM now() - min(stored_at)), 0)::float8 AS lag FROM outbox";

#[derive(QueryableByName)]
struct Backlog {
    #[diesel(sql_type = BigInt)]
    rows: i64,
    #[diesel(sql_type = Double)]
    lag: f64,
}

#[derive(QueryableByName)]
struct Due {
    #[diesel(sql_type = Bool)]
    due: bool,
}

/// How the relay sweeps.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Rows swept (published and deleted) per transaction.
    pub batch_size: i64,
    /// How old an unconfirmed row must be before the sweep takes it: long
    /// enough for its writer to have published it and confirmed it (a
    /// writer's publish waits for JetStream's ack, milliseconds), short
    /// against JetStream's duplicate window (2 minutes), inside which a row
    /// both its writer and the sweep publish is stored once.
    pub sweep_after: Duration,
    /// How often the relay deletes what writers confirmed and sweeps.
    pub interval: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            sweep_after: Duration::from_secs(5),
            interval: Duration::from_secs(1),
        }
    }
}

/// Why a relay step failed; a failed sweep rolled back, so its rows stay
/// and a later sweep publishes them.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A query failed.
    #[error("outbox query failed: {0}")]
    Database(#[from] diesel::result::Error),
    /// No connection could be had.
    #[error("no database connection: {0}")]
    Pool(String),
    /// JetStream did not take or did not acknowledge a message.
    #[error(transparent)]
    Publish(#[from] PublishError),
}

/// Deletes what writers confirmed and publishes what they did not.
pub struct Relay {
    pool: PgPool,
    js: jetstream::Context,
    config: RelayConfig,
    swept: Arc<AtomicU64>,
    metrics: MessagingMetrics,
    /// The outbox whose writers confirm rows to this relay.
    outbox: Option<Outbox>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// A relay for the outbox in `pool`'s database.
    pub fn new(pool: PgPool, js: jetstream::Context, config: RelayConfig) -> Self {
        Self {
            pool,
            js,
            config,
            swept: Arc::default(),
            metrics: MessagingMetrics::default(),
            outbox: None,
        }
    }

    /// Deletes the rows that `outbox`'s writers have published and
    /// JetStream acknowledged ([`Outbox::publish`]).
    #[must_use]
    pub fn forgetting_for(mut self, outbox: &Outbox) -> Self {
        self.outbox = Some(outbox.clone());
        self
    }

    /// Counts into `metrics` (the service's registered set).
    #[must_use]
    pub fn with_metrics(mut self, metrics: MessagingMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// A counter of the rows this relay's sweeps have published.
    pub fn swept_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.swept)
    }

    /// Every `interval`, or when writers have confirmed a delete's worth:
    /// deletes what they confirmed, then sweeps. On shutdown, once the
    /// writers have stopped, sweeps whatever is left, however young, so that
    /// a stopped service leaves nothing for its next start.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures = 0u32;
        loop {
            let confirmed = async {
                match &self.outbox {
                    Some(outbox) => outbox.confirmed.full.notified().await,
                    None => std::future::pending().await,
                }
            };
            let sweep = tokio::select! {
                () = shutdown.cancelled() => break,
                () = confirmed => false,
                _ = tick.tick() => true,
            };
            let result = async {
                self.forget().await?;
                if sweep {
                    // Rows whose writer failed to publish them (NATS down)
                    // go at once rather than when they have aged: a saga
                    // waits for them. Any row in flight that this takes
                    // along is published twice, and stored once.
                    let hurry = self.outbox.as_ref().is_some_and(Outbox::publish_failed);
                    let age = if hurry {
                        Duration::ZERO
                    } else {
                        self.config.sweep_after
                    };
                    if let Err(error) = self.sweep_all(age).await {
                        if let (true, Some(outbox)) = (hurry, &self.outbox) {
                            outbox.confirmed.failed.store(true, Ordering::Relaxed);
                        }
                        return Err(error);
                    }
                }
                Ok::<_, RelayError>(())
            }
            .await;
            match result {
                Ok(()) => failures = 0,
                Err(error) => {
                    failures += 1;
                    tracing::warn!(%error, failures, "outbox relay failed; trying again");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(backoff(failures)) => {}
                    }
                }
            }
        }
        let drained = tokio::time::timeout(DRAIN_TIME, async {
            self.forget().await?;
            self.sweep_all(Duration::ZERO).await
        })
        .await;
        match drained {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "outbox not drained at shutdown; the rest goes out at the next start");
            }
            Err(_) => {
                tracing::warn!(
                    "outbox not drained in time at shutdown; the rest goes out at the next start"
                );
            }
        }
    }

    /// Deletes the rows writers have confirmed since the last time, in one
    /// statement; without the wait for the disk (the pool's sessions say
    /// `synchronous_commit = off`, see the service's set-up), since a delete
    /// lost in a crash only lets the sweep publish the row again, which
    /// JetStream or the consumers' inboxes drop.
    async fn forget(&self) -> Result<(), RelayError> {
        let Some(outbox) = &self.outbox else {
            return Ok(());
        };
        let ids = outbox.take_confirmed();
        if ids.is_empty() {
            return Ok(());
        }
        let mut conn = self.connection().await?;
        KeepPrepared(diesel::sql_query(FORGET).bind::<Array<SqlUuid>, _>(&ids))
            .execute(&mut conn)
            .await?;
        Ok(())
    }

    /// Sweeps batches of rows at least `age` old until one comes back short.
    async fn sweep_all(&self, age: Duration) -> Result<(), RelayError> {
        while self.sweep(age).await? as i64 == self.config.batch_size {}
        Ok(())
    }

    /// Sweeps one batch of the rows older than `sweep_after`, as the timer
    /// does; returns how many it published.
    pub async fn sweep_once(&self) -> Result<usize, RelayError> {
        self.sweep(self.config.sweep_after).await
    }

    /// Publishes and deletes one batch of the oldest rows at least `age`
    /// old that no other relay holds; returns how many. Holding the row
    /// locks until the deletes commit keeps other relays off them; a failed
    /// publish rolls the deletes back. Ages are the database's: a writer's
    /// clock, whatever it says, cannot make a row look young.
    async fn sweep(&self, age: Duration) -> Result<usize, RelayError> {
        let mut conn = self.connection().await?;
        // Most looks find nothing: one statement, not a transaction, that
        // reads one index entry (the oldest row) however many rows writers
        // have confirmed or deleted since the table was last vacuumed.
        let due: Option<Due> =
            KeepPrepared(diesel::sql_query(OLDEST_DUE).bind::<Double, _>(age.as_secs_f64()))
                .get_result(&mut conn)
                .await
                .optional()?;
        if !due.is_some_and(|due| due.due) {
            return Ok(0);
        }
        let count = conn
            .transaction::<_, RelayError, _>(async |conn| {
                let rows: Vec<Row> = KeepPrepared(
                    diesel::sql_query(SWEEP)
                        .bind::<BigInt, _>(self.config.batch_size)
                        .bind::<Double, _>(age.as_secs_f64()),
                )
                .load(conn)
                .await?;
                publish_rows(&self.js, &self.metrics, &rows).await?;
                Ok(rows.len())
            })
            .await?;
        if count > 0 {
            tracing::info!(count, "outbox sweep published events no writer confirmed");
            self.swept.fetch_add(count as u64, Ordering::Relaxed);
            self.metrics.outbox_swept.inc_by(count as u64);
        }
        Ok(count)
    }

    async fn connection(
        &self,
    ) -> Result<
        diesel_async::pooled_connection::deadpool::Object<diesel_async::AsyncPgConnection>,
        RelayError,
    > {
        self.pool
            .get()
            .await
            .map_err(|error| RelayError::Pool(error.to_string()))
    }
}

/// 100 ms doubling up to 5 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(6).saturating_sub(1)))
        .min(Duration::from_secs(5))
}

/// How many rows the outbox in `pool`'s database holds (unconfirmed, or
/// confirmed and not yet deleted), and how long the oldest has waited; also
/// sets `metrics`' backlog gauges. Reads on the caller's pool, not the
/// relay's: whoever asks (a scrape) must never take the sweep's
/// connections.
pub async fn backlog(
    pool: &PgPool,
    metrics: &MessagingMetrics,
) -> Result<(i64, Duration), RelayError> {
    let mut conn = pool
        .get()
        .await
        .map_err(|error| RelayError::Pool(error.to_string()))?;
    // The oldest row's age by the database's clock, as the sweep sees it.
    let Backlog { rows, lag } = diesel::sql_query(BACKLOG).get_result(&mut conn).await?;
    let lag = Duration::try_from_secs_f64(lag).unwrap_or_default();
    metrics.outbox_pending.set(rows);
    metrics.outbox_lag.set(lag.as_secs_f64());
    Ok((rows, lag))
}
