//! One batch: parse and decode each message, apply the events of routes in
//! one statement (`statement`), then the others in one transaction (the
//! fast path, then, if a handler failed, the careful path with a savepoint
//! per message) after the locks their routes name (`locks`), try again in
//! place when a statement or the transaction failed for reasons that are
//! not the messages', then settle each message.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use diesel::prelude::*;
use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl};
use futures::FutureExt as _;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::Inner;
use super::failure::{BatchFailed, Failure, panic_message, split_retry_in_place};
use super::handler::{AfterCommit, Batch, Context, HandlerError};
use super::locks::record_in_inbox;
use super::router::{Entry, Handle};
use crate::envelope::{Envelope, OutgoingEvent};
use crate::metrics::ConsumerLabels;
use crate::outbox::{Written, unconfirmed_caused_by};
use crate::schema::inbox;
use crate::trace;

pub(super) enum Outcome {
    Applied,
    Duplicate,
    Ignored,
}

/// The pause before trying a batch again in place: 50 ms, doubling, at most
/// 5 s.
fn retry_here_delay(attempts: u32) -> Duration {
    Duration::from_millis(50u64 << attempts.saturating_sub(1).min(7)).min(Duration::from_secs(5))
}

/// Why the fast path gave a batch up.
pub(super) enum Abandoned {
    /// A handler failed (for a reason about its message).
    HandlerFailed(HandlerError),
    Database(diesel::result::Error),
}

impl From<diesel::result::Error> for Abandoned {
    fn from(error: diesel::result::Error) -> Self {
        Self::Database(error)
    }
}

/// A message that parsed and decodes, ready for its handler.
pub(super) struct Prepared<'m, S> {
    pub(super) envelope: Envelope,
    pub(super) route: &'m Entry<S>,
}

impl<S: Send + Sync + 'static> Inner<S> {
    /// Handles a batch of messages: those of routes in one statement in
    /// statements of their own, the others in one transaction, all together
    /// and with no savepoint; if a handler fails, again with each message in
    /// a savepoint of its own so that the failure rolls back only its own
    /// effects; then settles each message. A transaction that failed for
    /// reasons that say nothing about the messages (the database
    /// unreachable, a deadlock) is tried again here, the messages kept
    /// meanwhile, instead of spending their deliveries; on shutdown they go
    /// back to JetStream.
    pub(super) async fn process_batch(
        &self,
        batch: Vec<jetstream::Message>,
        shutdown: &CancellationToken,
    ) {
        let started = std::time::Instant::now();
        let mut events_out = true;
        let mut outcomes: Vec<Option<Result<Outcome, Failure>>> = Vec::with_capacity(batch.len());
        let mut prepared = Vec::new();
        for (index, message) in batch.iter().enumerate() {
            match self.prepare(message) {
                Ok(Some(ready)) => {
                    outcomes.push(None);
                    prepared.push((index, ready));
                }
                Ok(None) => outcomes.push(Some(Ok(Outcome::Ignored))),
                Err(failure) => outcomes.push(Some(Err(failure))),
            }
        }
        self.set_aside_unsettled(&batch, &mut prepared, &mut outcomes)
            .await;
        // Routes in one statement first, then the transaction's, then what
        // follows its saga's transaction message (see `in_phases`).
        let later = in_phases(&mut prepared);
        if !prepared.is_empty() {
            let mut attempts = 0u32;
            let applied = loop {
                let applying = AssertUnwindSafe(self.apply(&prepared, later)).catch_unwind();
                let applied = tokio::select! {
                    applied = applying => applied,
                    never = self.keep_alive(&batch) => match never {},
                };
                match applied {
                    // Nothing is wrong with the messages: keep them (and
                    // their leases) for as long as it takes, rather than
                    // spend their deliveries on an outage or on a lock
                    // someone else holds. Each try is bounded by the
                    // session's statement and lock timeouts.
                    Ok(Err(failed)) if failed.retry_in_place() => {
                        let reason = failed.reason();
                        attempts = attempts.saturating_add(1);
                        self.stats
                            .batches_tried_again
                            .fetch_add(1, Ordering::Relaxed);
                        self.metrics
                            .batches_tried_again
                            .get_or_create(&ConsumerLabels {
                                consumer: self.name.clone(),
                            })
                            .inc();
                        let delay = retry_here_delay(attempts);
                        tracing::warn!(consumer = %self.name, messages = batch.len(), attempts, ?delay, %reason, "batch failed; trying again");
                        tokio::select! {
                            () = shutdown.cancelled() => {
                                for message in &batch {
                                    let _ = message.ack_with(AckKind::Nak(None)).await;
                                }
                                return;
                            }
                            () = tokio::time::sleep(delay) => {}
                            never = self.keep_alive(&batch) => match never {},
                        }
                    }
                    other => break other,
                }
            };
            let results = match applied {
                Ok(Ok((results, written))) => {
                    // A message is acknowledged only once the events it
                    // caused are in JetStream: if they are not, it stays
                    // unacknowledged, and its redelivery publishes them
                    // (or finds the sweep did).
                    if let Err(error) = self.outbox.publish(written).await {
                        tracing::warn!(consumer = %self.name, messages = batch.len(), %error, "events committed but not published; the batch is redelivered after the ack wait");
                        events_out = false;
                    }
                    results
                }
                Ok(Err(failed)) => {
                    let reason = failed.reason();
                    prepared
                        .iter()
                        .map(|_| Err(Failure::Retryable(reason.clone())))
                        .collect()
                }
                Err(panic) => {
                    let reason = format!("batch panicked: {}", panic_message(&*panic));
                    prepared
                        .iter()
                        .map(|_| Err(Failure::Retryable(reason.clone())))
                        .collect()
                }
            };
            for ((index, _), result) in prepared.iter().zip(results) {
                outcomes[*index] = Some(result);
            }
        }
        let elapsed = started.elapsed();
        let outcomes: Vec<Result<Outcome, Failure>> = outcomes
            .into_iter()
            .map(|outcome| {
                outcome.unwrap_or_else(|| Err(Failure::Retryable("not processed".into())))
            })
            .collect();
        let failures = self.count_failures(&prepared, &outcomes).await;
        for (index, (message, outcome)) in batch.iter().zip(outcomes).enumerate() {
            let failed = failures
                .as_ref()
                .and_then(|counts| counts.get(&index).copied());
            self.settle(message, outcome, elapsed, events_out, failed)
                .await;
        }
    }

    /// Parses and decodes a message. `Ok(None)`: no route for its type.
    fn prepare<'m>(
        &'m self,
        message: &'m jetstream::Message,
    ) -> Result<Option<Prepared<'m, S>>, Failure> {
        let envelope = Envelope::parse(
            self.names.original_subject(&self.name, &message.subject),
            message.headers.as_ref(),
            message.payload.clone(),
        )
        .map_err(|error| Failure::Permanent(error.to_string()))?;
        let Some(route) = self.router.admit(&envelope).map_err(Failure::Permanent)? else {
            tracing::debug!(consumer = %self.name, event_type = %envelope.event_type, "no route; acked");
            return Ok(None);
        };
        Ok(Some(Prepared { envelope, route }))
    }

    /// Runs the prepared messages' handlers: those of routes in one
    /// statement first, each route's in a statement of its own
    /// (`statement`), then the others in one transaction; returns their
    /// outcomes, in `prepared`'s order, and the events to publish before
    /// they are acknowledged: those the handlers emitted, and those that
    /// earlier deliveries of the duplicates emitted and nobody has
    /// confirmed. `Err` when a statement or the transaction failed for a
    /// reason that says nothing about the messages: the transaction's
    /// messages were not applied, and those applied in statements before are
    /// recognised as redeliveries when the batch is tried again. A
    /// transaction that failed for another reason fails its own messages
    /// only: those applied in statements are settled as applied.
    ///
    /// The last `later` of `prepared` are messages in one statement that
    /// follow a message of their saga in the transaction ([`in_phases`]):
    /// they are applied after it commits, and fail with it.
    async fn apply(
        &self,
        prepared: &[(usize, Prepared<'_, S>)],
        later: usize,
    ) -> Result<(Vec<Result<Outcome, Failure>>, Written), BatchFailed> {
        let mut conn = self.pool.get().await.map_err(BatchFailed::NoConnection)?;
        let (first, after) = prepared.split_at(prepared.len() - later);
        let split = first.partition_point(|(_, ready)| in_one_statement(ready));
        let (in_statements, in_transaction) = first.split_at(split);
        let (mut results, mut written) = self.apply_in_statements(&mut conn, in_statements).await?;
        match self.apply_in_transaction(&mut conn, in_transaction).await {
            Ok((in_transaction_results, in_transaction_written)) => {
                results.extend(in_transaction_results);
                written.extend(in_transaction_written);
                let (after_results, after_written) =
                    self.apply_in_statements(&mut conn, after).await?;
                results.extend(after_results);
                written.extend(after_written);
            }
            // The statements committed before: their messages are applied,
            // and settled as such. Only the transaction's, and those that
            // were to follow it, are failed attempts, to be tried again.
            Err(failed) if !failed.retry_in_place() => {
                let reason = failed.reason();
                results.extend(
                    in_transaction
                        .iter()
                        .chain(after)
                        .map(|_| Err(Failure::Retryable(reason.clone()))),
                );
            }
            Err(failed) => return Err(failed),
        }
        let duplicates: Vec<uuid::Uuid> = prepared
            .iter()
            .zip(&results)
            .filter(|(_, result)| matches!(result, Ok(Outcome::Duplicate)))
            .map(|((_, ready), _)| ready.envelope.id)
            .collect();
        // Rare: a redelivery whose first delivery died between its commit
        // and its publish, or whose publish failed.
        written.extend(
            unconfirmed_caused_by(&mut conn, &duplicates)
                .await
                .map_err(BatchFailed::from)?,
        );
        Ok((results, written))
    }

    /// The messages of routes in the batch's transaction.
    async fn apply_in_transaction(
        &self,
        conn: &mut AsyncPgConnection,
        prepared: &[(usize, Prepared<'_, S>)],
    ) -> Result<(Vec<Result<Outcome, Failure>>, Written), BatchFailed> {
        if prepared.is_empty() {
            return Ok((Vec::new(), Written::default()));
        }
        let (results, written) = match self.apply_together(conn, prepared).await {
            Ok(applied) => applied,
            // A lone message's failure is all there is to know: rolled back
            // whole, as a savepoint would have rolled it back.
            Err(Abandoned::HandlerFailed(error)) if prepared.len() == 1 => {
                return Ok((vec![Err(Failure::from(error))], Written::default()));
            }
            // Someone failed: the careful path below finds out who.
            Err(Abandoned::HandlerFailed(_)) => self.apply_one_by_one(conn, prepared).await?,
            Err(Abandoned::Database(error)) => return Err(BatchFailed::from(error)),
        };
        Ok((results, written))
    }

    /// The careful path: each message in a savepoint of its own, so that a
    /// failure undoes only its own effects.
    async fn apply_one_by_one(
        &self,
        conn: &mut AsyncPgConnection,
        prepared: &[(usize, Prepared<'_, S>)],
    ) -> Result<(Vec<Result<Outcome, Failure>>, Written), BatchFailed> {
        let (results, written, after_commit) = conn
            .transaction::<_, diesel::result::Error, _>(async |conn| {
                self.lock(conn, prepared).await?;
                let mut results = Vec::with_capacity(prepared.len());
                let mut after_commit = Vec::new();
                let mut written = Written::default();
                for (_, ready) in prepared {
                    // The handler runs in the message's span (`run_handler`).
                    let result = self.apply_in_savepoint(conn, ready).await?;
                    results.push(result.map(|(outcome, work, events)| {
                        after_commit.extend(work);
                        written.extend(events);
                        outcome
                    }));
                }
                Ok((results, written, after_commit))
            })
            .await
            .map_err(BatchFailed::from)?;
        after_commit.into_iter().for_each(|work| work());
        Ok((results, written))
    }

    /// The fast path: the batch's locks and its inbox rows in one
    /// statement, and no savepoints. Abandoned (rolled back) as soon as any
    /// handler fails.
    async fn apply_together(
        &self,
        conn: &mut AsyncPgConnection,
        prepared: &[(usize, Prepared<'_, S>)],
    ) -> Result<(Vec<Result<Outcome, Failure>>, Written), Abandoned> {
        let (results, written, after_commit) = conn
            .transaction::<_, Abandoned, _>(async |conn| {
                let mut after_commit = Vec::new();
                let mut written = Written::default();
                let mut unique = HashSet::new();
                let ids: Vec<uuid::Uuid> = prepared
                    .iter()
                    .map(|(_, ready)| ready.envelope.id)
                    .filter(|id| unique.insert(*id))
                    .collect();
                let keys = self.lock_keys(conn, prepared).await?;
                let fresh = record_in_inbox(conn, &self.name, &ids, &keys).await?;
                let fresh: HashSet<uuid::Uuid> = fresh.into_iter().collect();
                // Already in the inbox, or a second copy within this batch.
                let mut unique = HashSet::new();
                let mut results: Vec<Option<Result<Outcome, Failure>>> = prepared
                    .iter()
                    .map(|(_, ready)| {
                        let id = ready.envelope.id;
                        (!fresh.contains(&id) || !unique.insert(id))
                            .then_some(Ok(Outcome::Duplicate))
                    })
                    .collect();
                for first in 0..prepared.len() {
                    if results[first].is_some() {
                        continue;
                    }
                    let route = prepared[first].1.route;
                    // A batch route takes the batch's other new events of its
                    // type along.
                    let members: Vec<usize> = match route.handle {
                        Handle::One(_) => vec![first],
                        Handle::Batch(_) | Handle::Statement(_) => (first..prepared.len())
                            .filter(|&index| {
                                results[index].is_none()
                                    && prepared[index].1.envelope.event_type
                                        == prepared[first].1.envelope.event_type
                            })
                            .collect(),
                    };
                    let group: Vec<&Prepared<'_, S>> = prepared
                        .iter()
                        .enumerate()
                        .filter(|(index, _)| members.binary_search(index).is_ok())
                        .map(|(_, (_, ready))| ready)
                        .collect();
                    let (work, events) = self.run_handler(conn, group).await.map_err(|error| {
                        match split_retry_in_place(error) {
                            Ok(error) => Abandoned::Database(error),
                            Err(error) => Abandoned::HandlerFailed(error),
                        }
                    })?;
                    after_commit.extend(work);
                    written.extend(events);
                    for index in members {
                        results[index] = Some(Ok(Outcome::Applied));
                    }
                }
                let results = results
                    .into_iter()
                    .map(|result| result.unwrap_or(Ok(Outcome::Applied)))
                    .collect();
                Ok((results, written, after_commit))
            })
            .await?;
        after_commit.into_iter().for_each(|work| work());
        Ok((results, written))
    }

    /// The careful path for one message: inbox row, handler and emitted
    /// events in a savepoint, so that a failure undoes only this message.
    /// The outer `Err` is a failure that says nothing about the message
    /// (retry in place): the whole batch is to be tried again.
    async fn apply_in_savepoint(
        &self,
        conn: &mut AsyncPgConnection,
        ready: &Prepared<'_, S>,
    ) -> Result<Result<(Outcome, Vec<AfterCommit>, Written), Failure>, diesel::result::Error> {
        let result = conn
            .transaction::<_, HandlerError, _>(async |conn| {
                let inserted = diesel::insert_into(inbox::table)
                    .values((
                        inbox::consumer.eq(&self.name),
                        inbox::event_id.eq(ready.envelope.id),
                    ))
                    .on_conflict_do_nothing()
                    .execute(conn)
                    .await?;
                if inserted == 0 {
                    return Ok((Outcome::Duplicate, Vec::new(), Written::default()));
                }
                let (work, written) = self.run_handler(conn, vec![ready]).await?;
                Ok((Outcome::Applied, work, written))
            })
            .await;
        match result {
            Ok(applied) => Ok(Ok(applied)),
            Err(error) => match split_retry_in_place(error) {
                Ok(in_place) => Err(in_place),
                Err(error) => Ok(Err(Failure::from(error))),
            },
        }
    }

    /// Runs the handler of `group`'s messages (one message, or several of
    /// one batch route) and writes the events they emitted, each under its
    /// message's span; returns the after-commit work and the rows written.
    /// A panicking handler is a retryable failure.
    async fn run_handler(
        &self,
        conn: &mut AsyncPgConnection,
        group: Vec<&Prepared<'_, S>>,
    ) -> Result<(Vec<AfterCommit>, Written), HandlerError> {
        let Some(route) = <[_]>::first(&group).map(|ready| ready.route) else {
            return Ok((Vec::new(), Written::default()));
        };
        let envelopes: Vec<&Envelope> = group.iter().map(|ready| &ready.envelope).collect();
        let spans: Vec<tracing::Span> = envelopes
            .iter()
            .map(|envelope| consumer_span(&self.name, envelope))
            .collect();
        // One message runs in its span; the spans of several cover their
        // shared handling, each in its own saga's trace.
        let current = match spans.as_slice() {
            [span] => span.clone(),
            _ => tracing::Span::none(),
        };
        let (result, emitted, after_commit) = match &route.handle {
            Handle::Statement(_) => {
                return Err(HandlerError::permanent(
                    "internal: a route in one statement reached a transaction",
                ));
            }
            Handle::One(handle) => {
                let [envelope] = envelopes.as_slice() else {
                    return Err(HandlerError::permanent(
                        "internal: a one-event route got several",
                    ));
                };
                let mut cx = Context {
                    conn: &mut *conn,
                    envelope,
                    emitted: Vec::new(),
                    after_commit: Vec::new(),
                };
                let result = AssertUnwindSafe(handle(&self.state, &mut cx, &envelope.body))
                    .catch_unwind()
                    .instrument(current)
                    .await;
                (result, vec![cx.emitted], cx.after_commit)
            }
            Handle::Batch(handle) => {
                let bodies = envelopes
                    .iter()
                    .map(|envelope| &envelope.body[..])
                    .collect();
                let mut batch = Batch {
                    conn: &mut *conn,
                    emitted: vec![Vec::new(); envelopes.len()],
                    envelopes,
                    after_commit: Vec::new(),
                };
                let result = AssertUnwindSafe(handle(&self.state, &mut batch, bodies))
                    .catch_unwind()
                    .instrument(current)
                    .await;
                (result, batch.emitted, batch.after_commit)
            }
        };
        match result {
            Ok(result) => result?,
            Err(panic) => {
                return Err(HandlerError::retryable(format!(
                    "handler panicked: {}",
                    panic_message(&*panic)
                )));
            }
        }
        let emitted: Vec<(&tracing::Span, Vec<OutgoingEvent>)> =
            spans.iter().zip(emitted).collect();
        let written = self.outbox.append_each(conn, emitted).await?;
        Ok((after_commit, written))
    }
}

/// Orders a batch's messages (given in the order they came) for `apply`:
/// those of routes in one statement first, then the transaction's, then
/// the messages in one statement that came after a transaction message of
/// their saga (the same correlation id). A statement commits before the
/// transaction; without the last group, a booking that a
/// cancellation overtook within one batch would be applied first, and the
/// customer would see a hold (and a charge) that the cancellation then
/// undoes, instead of the tombstone it leaves. Stable within each
/// group; returns the size of the last.
fn in_phases<S>(prepared: &mut [(usize, Prepared<'_, S>)]) -> usize {
    let mut sagas_in_transaction = HashSet::new();
    let mut phases = std::collections::HashMap::new();
    for (index, ready) in prepared.iter() {
        let saga = ready.envelope.correlation_id.as_deref();
        let phase = if !in_one_statement(ready) {
            sagas_in_transaction.extend(saga);
            1
        } else if saga.is_some_and(|saga| sagas_in_transaction.contains(saga)) {
            2
        } else {
            0
        };
        phases.insert(*index, phase);
    }
    prepared.sort_by_key(|(index, _)| phases[index]);
    phases.values().filter(|&&phase| phase == 2).count()
}

/// Whether the message's route applies it in a statement of its own.
fn in_one_statement<S>(ready: &Prepared<'_, S>) -> bool {
    matches!(ready.route.handle, Handle::Statement(_))
}

/// The consumer-kind span of one message, a child of the producer's span.
pub(super) fn consumer_span(consumer: &str, envelope: &Envelope) -> tracing::Span {
    let span = tracing::info_span!(
        "process",
        otel.name = format!("{} process", envelope.subject),
        otel.kind = "consumer",
        pg_jetstream.service = %consumer,
        messaging.system = "nats",
        messaging.operation.type = "process",
        messaging.destination.name = %envelope.subject,
        messaging.consumer.group.name = %consumer,
        messaging.message.id = %envelope.id,
        order_id = envelope.correlation_id.as_deref().unwrap_or_default(),
        trace_id = tracing::field::Empty,
    );
    trace::continue_from(
        &span,
        envelope.traceparent.as_deref(),
        envelope.tracestate.as_deref(),
    );
    span.record("trace_id", trace::trace_id(&span));
    span
}
