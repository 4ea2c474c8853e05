//! The advisory locks a batch takes before its inbox rows and any handler:
//! on the names its routes give ([`Route::locking`](super::Route::locking)),
//! in one order, so that batches on several replicas queue instead of
//! deadlocking; and the inbox rows, written in the same statement.

use std::collections::{BTreeMap, HashSet};

use crate::db::KeepPrepared;
use diesel::QueryResult;
use diesel::prelude::QueryableByName;
use diesel::sql_types::{Array, BigInt, Text, Uuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::Inner;
use super::batch::Prepared;
use super::router::Locks;

diesel::define_sql_function! {
    /// Takes an advisory lock on each key, in the order given (see the
    /// messaging migrations).
    fn consumer_lock_keys(keys: diesel::sql_types::Array<diesel::sql_types::BigInt>) -> diesel::sql_types::Integer;
}

/// A stable 64-bit advisory lock key for a lock name (FNV-1a), the same in
/// every process.
fn lock_key(name: &str) -> i64 {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    i64::from_ne_bytes(hash.to_ne_bytes())
}

impl<S: Send + Sync + 'static> Inner<S> {
    /// The advisory lock keys of what the batch's events name (see
    /// [`Route::locking`](super::Route::locking)), ascending: the one order
    /// every batch takes them in.
    pub(super) async fn lock_keys(
        &self,
        conn: &mut AsyncPgConnection,
        prepared: &[(usize, Prepared<'_, S>)],
    ) -> QueryResult<Vec<i64>> {
        // The bodies of each locking route's events, by event type.
        let mut by_route: BTreeMap<&str, (Locks<S>, Vec<&[u8]>)> = BTreeMap::new();
        for (_, ready) in prepared {
            if let Some(locks) = ready.route.locks {
                by_route
                    .entry(ready.envelope.event_type.as_str())
                    .or_insert_with(|| (locks, Vec::new()))
                    .1
                    .push(&ready.envelope.body);
            }
        }
        let mut keys = Vec::new();
        for (locks, bodies) in by_route.into_values() {
            keys.extend(
                locks(&self.state, conn, bodies)
                    .await?
                    .iter()
                    .map(|name| lock_key(name)),
            );
        }
        keys.sort_unstable();
        keys.dedup();
        Ok(keys)
    }

    /// Takes the advisory locks that the batch's events name, before any
    /// handler runs.
    pub(super) async fn lock(
        &self,
        conn: &mut AsyncPgConnection,
        prepared: &[(usize, Prepared<'_, S>)],
    ) -> QueryResult<()> {
        let keys = self.lock_keys(conn, prepared).await?;
        take_locks(conn, keys).await
    }
}

/// Takes an advisory lock on each key, in the order given, in one
/// statement.
async fn take_locks(conn: &mut AsyncPgConnection, keys: Vec<i64>) -> QueryResult<()> {
    if !keys.is_empty() {
        diesel::select(consumer_lock_keys(keys))
            .execute(conn)
            .await?;
    }
    Ok(())
}

/// A batch's inbox rows: `$1` the consumer, `$2` the events' ids (each
/// once); returns the ids that were not there before. The rows go in in
/// the ids' order, so that two batches holding copies of the same events
/// (redeliveries on two replicas) never wait on each other's rows
/// crosswise.
const RECORD: &str = "\
INSERT INTO inbox (consumer, event_id)
SELECT $1, id FROM unnest($2::uuid[]) AS id
ORDER BY id
ON CONFLICT DO NOTHING
RETURNING event_id";

/// [`RECORD`] after the batch's advisory locks (`$3`, ascending), in one
/// statement: the rows are selected from the locks' result, so that none is
/// written before every lock is held.
const LOCK_AND_RECORD: &str = "\
WITH locked AS (SELECT consumer_lock_keys($3::int8[]))
INSERT INTO inbox (consumer, event_id)
SELECT $1, id FROM locked, unnest($2::uuid[]) AS id
ORDER BY id
ON CONFLICT DO NOTHING
RETURNING event_id";

#[derive(QueryableByName)]
struct Recorded {
    #[diesel(sql_type = Uuid)]
    event_id: uuid::Uuid,
}

/// Takes the advisory locks `keys` (ascending), then writes the inbox rows
/// of `ids` for `consumer`, in one statement, and returns the ids that were
/// not there before (the others are redeliveries). Every lock comes before
/// any inbox row, so that no batch waits on another's uncommitted inbox row
/// while holding a lock that one needs: a batch holding its inbox rows
/// holds all its locks already.
pub(super) async fn record_in_inbox(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    ids: &[uuid::Uuid],
    keys: &[i64],
) -> QueryResult<HashSet<uuid::Uuid>> {
    let recorded: Vec<Recorded> = if keys.is_empty() {
        KeepPrepared(
            diesel::sql_query(RECORD)
                .bind::<Text, _>(consumer)
                .bind::<Array<Uuid>, _>(ids),
        )
        .load(conn)
        .await?
    } else {
        KeepPrepared(
            diesel::sql_query(LOCK_AND_RECORD)
                .bind::<Text, _>(consumer)
                .bind::<Array<Uuid>, _>(ids)
                .bind::<Array<BigInt>, _>(keys),
        )
        .load(conn)
        .await?
    };
    Ok(recorded.into_iter().map(|row| row.event_id).collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use diesel_async::{AsyncConnection as _, SimpleAsyncConnection as _};

    use super::*;

    async fn record(conn: &mut AsyncPgConnection, ids: &[uuid::Uuid]) -> QueryResult<usize> {
        Ok(record_in_inbox(conn, "billing", ids, &[]).await?.len())
    }

    /// A batch that holds one event's inbox row and then writes another's
    /// is not deadlocked by a second batch given both events in the other
    /// order (copies redelivered to another replica): the second writes in
    /// id order, so it waits on the first row without holding the other.
    #[tokio::test(flavor = "multi_thread")]
    async fn batches_given_the_same_events_in_opposite_orders_do_not_deadlock() {
        let postgres = shop_test_support::TestPostgres::start().await;
        let url = postgres.create_database("inbox").await;
        crate::db::migrate(&url, vec![crate::MIGRATIONS])
            .await
            .unwrap();
        let (low, high) = (uuid::Uuid::from_u128(1), uuid::Uuid::from_u128(2));

        let mut first = AsyncPgConnection::establish(&url).await.unwrap();
        first.batch_execute("BEGIN").await.unwrap();
        assert_eq!(record(&mut first, &[low]).await.unwrap(), 1);

        // The second batch, given `high` then `low`, waits for the first.
        let second = tokio::spawn({
            let url = url.clone();
            async move {
                let mut second = AsyncPgConnection::establish(&url).await.unwrap();
                second.batch_execute("BEGIN").await.unwrap();
                let fresh = record(&mut second, &[high, low]).await;
                second.batch_execute("COMMIT").await.map(|()| fresh)
            }
        });
        let mut watcher = AsyncPgConnection::establish(&url).await.unwrap();
        let started = std::time::Instant::now();
        loop {
            let waiting: i64 = diesel::select(diesel::dsl::sql::<BigInt>(
                "(SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock')",
            ))
            .get_result(&mut watcher)
            .await
            .unwrap();
            if waiting == 1 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the second batch never waited"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // In delivery order the second would hold `high` now, and this
        // would wait on it while it waits on `low`: a deadlock.
        assert_eq!(record(&mut first, &[high]).await.unwrap(), 1);
        first.batch_execute("COMMIT").await.unwrap();
        let second = second.await.unwrap();
        assert_eq!(
            second.unwrap().unwrap(),
            0,
            "both rows were the first batch's"
        );
    }
}
