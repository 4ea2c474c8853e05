//! Routes in one statement ([`Route::in_one_statement`](super::Route::in_one_statement)):
//! a batch's events of such a route are applied without a transaction. The
//! handler reads without locks, decides, and writes once; its statement
//! carries the events' inbox rows and what they emitted, and commits by
//! itself, or, when what was read no longer holds, raises a serialization
//! failure and writes nothing. Two statements per batch where a
//! transaction takes `BEGIN`, the locks and the inbox rows, the reads, the
//! writes and `COMMIT`.
//!
//! The inbox is not read first: `inbox_write` refuses an event recorded
//! already, which undoes the statement, and only then are the batch's
//! events looked up, the recorded ones settled as redeliveries and the
//! others decided again.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;

use crate::db::KeepPrepared;
use diesel::QueryableByName;
use diesel::result::{DatabaseErrorKind, Error as DbError};
use diesel::sql_types::{Array, Text, Uuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures::FutureExt as _;
use tracing::Instrument as _;

use super::Inner;
use super::batch::{Outcome, Prepared, consumer_span};
use super::failure::{BatchFailed, Failure, panic_message, split_retry_in_place};
use super::handler::{HandlerError, Statement};
use super::router::Handle;
use crate::metrics::ConsumerLabels;
use crate::outbox::Written;

/// Why a route's statement wrote nothing.
enum NotWritten {
    /// An event of the batch is in the inbox already.
    Recorded,
    /// For no reason of the events' (see [`BatchFailed::retry_in_place`]).
    InPlace(DbError),
    /// The handler failed.
    Handler(HandlerError),
}

/// The inbox rows and the events of a handler that changed nothing.
const CARRY: &str = "SELECT inbox_write($1, $2::uuid[]), outbox_write($3::jsonb)";

/// Which of these events' inbox rows exist.
const RECORDED: &str = "\
SELECT event_id FROM inbox WHERE consumer = $1 AND event_id = ANY($2::uuid[])";

#[derive(QueryableByName)]
struct Recorded {
    #[diesel(sql_type = Uuid)]
    event_id: uuid::Uuid,
}

/// Serialization failures tried again at once, without a pause, before
/// the batch is tried again in place after one.
const STALE_RETRIES: u32 = 3;

impl<S: Send + Sync + 'static> Inner<S> {
    /// Applies `prepared` (all of them on routes in one statement), each
    /// route's events in a statement of its own; returns their outcomes, in
    /// `prepared`'s order, and the events to publish. `Err` when a statement
    /// failed for a reason that says nothing about the events: the batch is
    /// tried again, and what was applied before is found in the inbox then.
    pub(super) async fn apply_in_statements(
        &self,
        conn: &mut AsyncPgConnection,
        prepared: &[(usize, Prepared<'_, S>)],
    ) -> Result<(Vec<Result<Outcome, Failure>>, Written), BatchFailed> {
        let mut results: Vec<Option<Result<Outcome, Failure>>> =
            prepared.iter().map(|_| None).collect();
        // A second copy of an event within the batch.
        let mut unique = HashSet::new();
        for (position, (_, ready)) in prepared.iter().enumerate() {
            if !unique.insert(ready.envelope.id) {
                results[position] = Some(Ok(Outcome::Duplicate));
            }
        }
        let mut written = Written::default();
        for first in 0..prepared.len() {
            if results[first].is_some() {
                continue;
            }
            let members: Vec<usize> = (first..prepared.len())
                .filter(|&position| {
                    results[position].is_none()
                        && prepared[position].1.envelope.event_type
                            == prepared[first].1.envelope.event_type
                })
                .collect();
            let outcomes = self
                .apply_route(conn, prepared, &members, &mut written)
                .await?;
            for (position, outcome) in members.into_iter().zip(outcomes) {
                results[position] = Some(outcome);
            }
        }
        let results = results
            .into_iter()
            .map(|result| result.unwrap_or(Ok(Outcome::Applied)))
            .collect();
        Ok((results, written))
    }

    /// One route's events together; if the handler fails, each on its own.
    /// Outcomes in `members`' order.
    async fn apply_route(
        &self,
        conn: &mut AsyncPgConnection,
        prepared: &[(usize, Prepared<'_, S>)],
        members: &[usize],
        written: &mut Written,
    ) -> Result<Vec<Result<Outcome, Failure>>, BatchFailed> {
        let mut outcomes: Vec<Option<Result<Outcome, Failure>>> =
            members.iter().map(|_| None).collect();
        let mut pending: Vec<usize> = (0..members.len()).collect();
        let mut stale = 0;
        while !pending.is_empty() {
            let group: Vec<&Prepared<'_, S>> = pending
                .iter()
                .map(|&member| &prepared[members[member]].1)
                .collect();
            match self.apply_statement(conn, group).await {
                Ok(rows) => {
                    written.extend(rows);
                    for member in pending.drain(..) {
                        outcomes[member] = Some(Ok(Outcome::Applied));
                    }
                }
                Err(NotWritten::Recorded) => {
                    let ids: Vec<uuid::Uuid> = pending
                        .iter()
                        .map(|&member| prepared[members[member]].1.envelope.id)
                        .collect();
                    let recorded = self.recorded(conn, &ids).await?;
                    if recorded.is_empty() {
                        // Refused, then not found: a copy's statement
                        // committed and its rows went away (pruned) since.
                        // Nothing is known: the messages are retried.
                        return Err(BatchFailed::Transaction(DbError::RollbackTransaction));
                    }
                    pending.retain(|&member| {
                        let is_recorded =
                            recorded.contains(&prepared[members[member]].1.envelope.id);
                        if is_recorded {
                            outcomes[member] = Some(Ok(Outcome::Duplicate));
                        }
                        !is_recorded
                    });
                }
                Err(NotWritten::InPlace(DbError::DatabaseError(
                    DatabaseErrorKind::SerializationFailure,
                    _,
                ))) if stale < STALE_RETRIES => {
                    stale += 1;
                    self.count_stale_retry();
                }
                Err(NotWritten::InPlace(error)) => return Err(BatchFailed::from(error)),
                Err(NotWritten::Handler(error)) if pending.len() == 1 => {
                    outcomes[pending[0]] = Some(Err(Failure::from(error)));
                    pending.clear();
                }
                // Someone failed: each on its own finds out who.
                Err(NotWritten::Handler(_)) => {
                    let alone = std::mem::take(&mut pending);
                    for member in alone {
                        let outcome =
                            Box::pin(self.apply_route(conn, prepared, &[members[member]], written))
                                .await?;
                        outcomes[member] = outcome.into_iter().next();
                    }
                }
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|outcome| outcome.unwrap_or(Ok(Outcome::Applied)))
            .collect())
    }

    /// Counts a write refused because what it read had changed.
    fn count_stale_retry(&self) {
        self.stats.stale_retries.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .stale_retries
            .get_or_create(&ConsumerLabels {
                consumer: self.name.clone(),
            })
            .inc();
    }

    /// Runs the route's handler on `group` and, if it changed nothing,
    /// writes the inbox rows and what it emitted; returns the rows to
    /// publish.
    async fn apply_statement(
        &self,
        conn: &mut AsyncPgConnection,
        group: Vec<&Prepared<'_, S>>,
    ) -> Result<Written, NotWritten> {
        let Some(route) = <[_]>::first(&group).map(|ready| ready.route) else {
            return Ok(Written::default());
        };
        let Handle::Statement(handle) = &route.handle else {
            return Err(NotWritten::Handler(HandlerError::permanent(
                "internal: a route in a transaction reached the statements' path",
            )));
        };
        let spans: Vec<tracing::Span> = group
            .iter()
            .map(|ready| consumer_span(&self.name, &ready.envelope))
            .collect();
        // One message runs in its span; the spans of several cover their
        // shared handling, each in its own saga's trace.
        let current = match spans.as_slice() {
            [span] => span.clone(),
            _ => tracing::Span::none(),
        };
        let bodies = group.iter().map(|ready| &ready.envelope.body[..]).collect();
        let mut step = Statement {
            conn: &mut *conn,
            envelopes: group.iter().map(|ready| &ready.envelope).collect(),
            emitted: vec![Vec::new(); group.len()],
            after_commit: Vec::new(),
            consumer: &self.name,
            outbox: &self.outbox,
            spans: &spans,
            carried: None,
            emitted_after_carry: false,
        };
        let result = AssertUnwindSafe(handle(&self.state, &mut step, bodies))
            .catch_unwind()
            .instrument(current.clone())
            .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(not_written(error)),
            Err(panic) => {
                return Err(NotWritten::Handler(HandlerError::retryable(format!(
                    "handler panicked: {}",
                    panic_message(&*panic)
                ))));
            }
        }
        if step.emitted_after_carry {
            return Err(NotWritten::Handler(HandlerError::permanent(
                "internal: the handler emitted events after its statement carried them",
            )));
        }
        let after_commit = std::mem::take(&mut step.after_commit);
        let written = match step.carried.take() {
            Some(written) => written,
            // It changed nothing: its inbox rows, and anything it emitted,
            // in a statement of the consumer's own.
            None => {
                let carried = step.carry();
                let written = step.carried.take().unwrap_or_default();
                KeepPrepared(
                    diesel::sql_query(CARRY)
                        .bind::<Text, _>(carried.consumer())
                        .bind::<Array<Uuid>, _>(carried.event_ids())
                        .bind::<Text, _>(carried.events_json()),
                )
                .execute(conn)
                .instrument(current)
                .await
                .map_err(|error| not_written(error.into()))?;
                written
            }
        };
        after_commit.into_iter().for_each(|work| work());
        Ok(written)
    }

    /// Which of `ids` the inbox holds for this consumer.
    async fn recorded(
        &self,
        conn: &mut AsyncPgConnection,
        ids: &[uuid::Uuid],
    ) -> Result<HashSet<uuid::Uuid>, BatchFailed> {
        let rows: Vec<Recorded> = KeepPrepared(
            diesel::sql_query(RECORDED)
                .bind::<Text, _>(&self.name)
                .bind::<Array<Uuid>, _>(ids),
        )
        .load(conn)
        .await?;
        Ok(rows.into_iter().map(|row| row.event_id).collect())
    }
}

/// What a handler's failure means for its statement.
fn not_written(error: HandlerError) -> NotWritten {
    if let HandlerError::Retryable(source) = &error
        && let Some(DbError::DatabaseError(DatabaseErrorKind::UniqueViolation, info)) =
            source.downcast_ref::<DbError>()
        && info.constraint_name() == Some("inbox_pkey")
    {
        return NotWritten::Recorded;
    }
    match split_retry_in_place(error) {
        Ok(in_place) => NotWritten::InPlace(in_place),
        Err(error) => NotWritten::Handler(error),
    }
}
