//! Fetching and leases: the pull loop, batches of whatever has arrived,
//! messages held (progress-acked) while every batch slot is busy, the lease
//! of a batch in progress, and what goes back to JetStream on shutdown.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::MessagesErrorKind;
use async_nats::jetstream::{self, AckKind};
use diesel_async::RunQueryDsl;
use futures::{FutureExt as _, StreamExt as _};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{EventConsumer, Inner};
use crate::metrics::ConsumerLabels;

impl<S: Send + Sync + 'static> EventConsumer<S> {
    /// Provisions the durable consumer and handles messages until `shutdown`
    /// is cancelled; then stops fetching, lets the batches in hand finish,
    /// hands the messages fetched but not started back to JetStream (nak),
    /// and returns. A message still on its way from an open pull request is
    /// delivered again after the ack wait.
    ///
    /// A pull that fails is started again at once; one that fails again
    /// waits, 0.4 s doubling to 5 s, and provisions the durable again first,
    /// as does a pull that JetStream ended because the durable was deleted:
    /// an operator's `nats consumer rm`, a stream made anew or a cluster
    /// restored from a backup is repaired without a restart. The new durable
    /// starts at the stream's first message, so nothing published meanwhile
    /// is missed; what was applied before comes again and the inbox (kept
    /// longer than the streams keep messages) acks it without effect.
    pub async fn run(self, shutdown: CancellationToken) {
        let labels = ConsumerLabels {
            consumer: self.inner.name.clone(),
        };
        let up = self
            .inner
            .metrics
            .consumer_up
            .get_or_create(&labels)
            .clone();
        // The consumer's counters exist from the start, at zero, so that
        // their rates are 0 rather than absent until the first event.
        let metrics = &self.inner.metrics;
        let _ = (
            metrics.batches_tried_again.get_or_create(&labels),
            metrics.stale_retries.get_or_create(&labels),
        );
        // The broker may be down at start-up or mid-way: keep trying.
        let Some(mut consumer) = self.provision(&shutdown).await else {
            return;
        };
        up.set(1);
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
        // Pulls failed in a row, and whether the last failure said the
        // durable is gone.
        let (mut failures, mut gone) = (0u32, false);
        'fetch: while !shutdown.is_cancelled() {
            if failures > 1 {
                up.set(0);
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(reconnect_delay(failures - 1)) => {}
                }
            }
            if failures > 1 || gone {
                match self.provision(&shutdown).await {
                    Some(provisioned) => consumer = provisioned,
                    None => break,
                }
                up.set(1);
                gone = false;
            }
            let stream = consumer
                .stream()
                .max_messages_per_batch(self.concurrency * self.batch_size)
                // The client re-sends its pull when its connection comes
                // back; a pull lost without a disconnect (the consumer
                // recreated, its leader moved) shows as two missed
                // heartbeats. Each heartbeat and each renewed pull wakes
                // the server and this process, per consumer: these find a
                // lost pull within ten seconds at a fraction of a wake-up
                // per second.
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
                .messages()
                .await;
            let mut messages = match stream {
                Ok(messages) => messages,
                Err(error) => {
                    failures += 1;
                    tracing::warn!(consumer = %self.inner.name, error = %error, failures, "cannot pull messages; retrying");
                    continue;
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
                            // Missed heartbeats, a reconnect, the durable
                            // deleted: start a fresh pull.
                            failures += 1;
                            gone = matches!(
                                error.kind(),
                                MessagesErrorKind::ConsumerDeleted
                                    | MessagesErrorKind::NoResponders
                            );
                            tracing::warn!(consumer = %self.inner.name, error = %error, failures, "pull consumer error; pulling again");
                            continue 'fetch;
                        }
                        None => {
                            failures += 1;
                            tracing::warn!(consumer = %self.inner.name, failures, "message stream ended; pulling again");
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
                if failures > 0 {
                    failures = 0;
                    up.set(1);
                }
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

impl<S: Send + Sync + 'static> EventConsumer<S> {
    /// Creates the durable, or finds it (the request is idempotent), trying
    /// again with a growing delay; `None` when shut down meanwhile.
    async fn provision(&self, shutdown: &CancellationToken) -> Option<PullConsumer> {
        let mut failures = 0u32;
        loop {
            match self.spec.provision(&self.inner.js).await {
                Ok(consumer) => return Some(consumer),
                Err(error) => {
                    failures += 1;
                    tracing::warn!(consumer = %self.inner.name, error = %error, failures, "cannot provision the consumer; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return None,
                        () = tokio::time::sleep(reconnect_delay(failures)) => {}
                    }
                }
            }
        }
    }
}

impl<S: Send + Sync + 'static> Inner<S> {
    /// Tells JetStream every third of the ack wait that the batch is still
    /// being worked on, so that a slow batch (waiting for locks, say) is not
    /// delivered again to another replica meanwhile; runs until dropped.
    pub(super) async fn keep_alive(
        &self,
        batch: &[jetstream::Message],
    ) -> std::convert::Infallible {
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

/// How many rows one statement of the hourly clean-up deletes: a backlog of
/// millions goes in steps that each finish well inside the session's
/// statement timeout, instead of one statement that never does.
const PRUNE_CHUNK: i64 = 5_000;

/// Deletes this consumer's inbox rows and failure counts older than
/// `retention`, hourly, in chunks.
async fn prune_inbox<S>(inner: Arc<Inner<S>>, retention: Duration, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let cutoff = chrono::Utc::now() - retention;
        for table in ["inbox", "consumer_failures"] {
            match prune(&inner, table, cutoff, &shutdown).await {
                Ok(0) => {}
                Ok(deleted) => tracing::debug!(consumer = %inner.name, table, deleted, "pruned"),
                Err(error) => {
                    tracing::warn!(consumer = %inner.name, table, %error, "pruning failed")
                }
            }
        }
    }
}

/// Deletes `table`'s rows of this consumer older than `cutoff`,
/// [`PRUNE_CHUNK`] at a time, until none is left or shutdown; returns how
/// many.
pub(super) async fn prune<S>(
    inner: &Inner<S>,
    table: &str,
    cutoff: chrono::DateTime<chrono::Utc>,
    shutdown: &CancellationToken,
) -> Result<usize, String> {
    let column = if table == "inbox" {
        "received_at"
    } else {
        "failed_at"
    };
    let statement = format!(
        "DELETE FROM {table} WHERE (consumer, event_id) IN (
             SELECT consumer, event_id FROM {table}
             WHERE consumer = $1 AND {column} < $2 LIMIT $3)"
    );
    let mut deleted = 0;
    while !shutdown.is_cancelled() {
        let mut conn = inner.pool.get().await.map_err(|error| error.to_string())?;
        let chunk = diesel::sql_query(&statement)
            .bind::<diesel::sql_types::Text, _>(&inner.name)
            .bind::<diesel::sql_types::Timestamptz, _>(cutoff)
            .bind::<diesel::sql_types::BigInt, _>(PRUNE_CHUNK)
            .execute(&mut conn)
            .await
            .map_err(|error| error.to_string())?;
        deleted += chunk;
        if i64::try_from(chunk).unwrap_or(i64::MAX) < PRUNE_CHUNK {
            break;
        }
    }
    Ok(deleted)
}

fn reconnect_delay(failures: u32) -> Duration {
    Duration::from_millis(200u64 << failures.min(5)).min(Duration::from_secs(5))
}
