//! The advisory locks a batch takes before its inbox rows and any handler:
//! on the names its routes give ([`Route::locking`](super::Route::locking)),
//! in one order, so that batches on several replicas queue instead of
//! deadlocking.

use std::collections::BTreeMap;

use diesel::QueryResult;
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
/// statement; on a shared connection, so that a caller can send another
/// statement with it in the same round trip.
pub(super) async fn take_locks(mut conn: &AsyncPgConnection, keys: Vec<i64>) -> QueryResult<()> {
    if !keys.is_empty() {
        diesel::select(consumer_lock_keys(keys))
            .execute(&mut conn)
            .await?;
    }
    Ok(())
}
