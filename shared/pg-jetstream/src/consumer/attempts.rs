//! How many times a message was tried: failed attempts counted per event
//! in the `consumer_failures` table (shared by replicas and restarts), and
//! the messages delivered so often without settling that they are set
//! aside untried.

use std::collections::HashMap;

use async_nats::jetstream;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Integer, Text, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;

use super::Inner;
use super::batch::{Outcome, Prepared};
use super::failure::Failure;
use crate::schema::inbox;

#[derive(QueryableByName)]
struct FailureCount {
    #[diesel(sql_type = SqlUuid)]
    event_id: uuid::Uuid,
    #[diesel(sql_type = Integer)]
    failures: i32,
}

impl<S: Send + Sync + 'static> Inner<S> {
    /// Counts one more handler failure for each prepared message that failed
    /// with a retryable failure, and returns each one's count so far by its index in the
    /// batch; `None` when the counts could not be written (the database
    /// went away): those messages are retried without spending anything.
    pub(super) async fn count_failures(
        &self,
        prepared: &[(usize, Prepared<'_, S>)],
        outcomes: &[Result<Outcome, Failure>],
    ) -> Option<HashMap<usize, i64>> {
        let failed: Vec<(usize, uuid::Uuid)> = prepared
            .iter()
            .filter(|(index, _)| matches!(outcomes[*index], Err(Failure::Retryable(_))))
            .map(|(index, ready)| (*index, ready.envelope.id))
            .collect();
        if failed.is_empty() {
            return Some(HashMap::new());
        }
        let mut ids: Vec<uuid::Uuid> = failed.iter().map(|(_, id)| *id).collect();
        ids.sort_unstable();
        ids.dedup();
        let counted = async {
            let mut conn = self.pool.get().await.map_err(|error| error.to_string())?;
            // A count that reached the limit was dead-lettered: a failure
            // after that (its replay) starts a new round of attempts.
            diesel::sql_query(
                "INSERT INTO consumer_failures (consumer, event_id, failures)
                 SELECT $1, id, 1 FROM unnest($2::uuid[]) AS id
                 ON CONFLICT (consumer, event_id) DO UPDATE SET
                     failures = CASE WHEN consumer_failures.failures >= $3 THEN 1
                                     ELSE consumer_failures.failures + 1 END,
                     failed_at = now()
                 RETURNING event_id, failures",
            )
            .bind::<Text, _>(&self.name)
            .bind::<Array<SqlUuid>, _>(&ids)
            .bind::<BigInt, _>(self.retry.max_deliver)
            .load::<FailureCount>(&mut conn)
            .await
            .map_err(|error| error.to_string())
        }
        .await;
        match counted {
            Ok(counts) => {
                let by_id: HashMap<uuid::Uuid, i64> = counts
                    .into_iter()
                    .map(|count| (count.event_id, i64::from(count.failures)))
                    .collect();
                Some(
                    failed
                        .into_iter()
                        .filter_map(|(index, id)| Some((index, *by_id.get(&id)?)))
                        .collect(),
                )
            }
            Err(error) => {
                tracing::warn!(consumer = %self.name, %error, "cannot count the handlers' failures; retrying without counting them");
                None
            }
        }
    }

    /// Messages delivered more than [`RetryPolicy::max_deliveries`] times
    /// that are not applied yet are dead-lettered without another attempt:
    /// their handling may be what stops the process. Those already applied
    /// stay in the batch, which acks them as duplicates.
    pub(super) async fn set_aside_unsettled(
        &self,
        batch: &[jetstream::Message],
        prepared: &mut Vec<(usize, Prepared<'_, S>)>,
        outcomes: &mut [Option<Result<Outcome, Failure>>],
    ) {
        let delivered = |index: usize| batch[index].info().map_or(1, |info| info.delivered);
        let suspects: Vec<uuid::Uuid> = prepared
            .iter()
            .filter(|(index, _)| delivered(*index) > self.retry.max_deliveries)
            .map(|(_, ready)| ready.envelope.id)
            .collect();
        if suspects.is_empty() {
            return;
        }
        let applied = async {
            let mut conn = self.pool.get().await.map_err(|error| error.to_string())?;
            inbox::table
                .filter(inbox::consumer.eq(&self.name))
                .filter(inbox::event_id.eq_any(&suspects))
                .select(inbox::event_id)
                .load::<uuid::Uuid>(&mut conn)
                .await
                .map_err(|error| error.to_string())
        }
        .await;
        // Not known: the batch goes ahead; the next delivery asks again.
        let Ok(applied) = applied else {
            return;
        };
        prepared.retain(|(index, ready)| {
            let delivered = delivered(*index);
            if delivered <= self.retry.max_deliveries || applied.contains(&ready.envelope.id) {
                return true;
            }
            outcomes[*index] = Some(Err(Failure::Permanent(format!(
                "delivered {delivered} times and never settled: its handling may stop the process"
            ))));
            false
        });
    }
}
