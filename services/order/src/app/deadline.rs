//! Step t: the deadline sweeper.

use std::time::Duration;

use chrono::Utc;
use diesel_async::{AsyncConnection as _, AsyncPgConnection};
use pg_jetstream::db::error_chain;
use pg_jetstream::{Outbox, envelope::OutgoingEvent, outbox::Written};
use shop_proto::order::v1::OrderCancelled;
use shop_service::ApiError;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Orders;
use crate::domain::{self, Decision, SagaEvent, Status};
use crate::metrics::SagaEnd;
use crate::store;

impl Orders {
    /// Step t: cancels PENDING orders past their deadline, a batch per
    /// transaction, until shutdown. Replicas share the work (`SKIP LOCKED`).
    ///
    /// Between sweeps it sleeps until the earliest PENDING deadline: an
    /// order placed meanwhile is due a whole saga deadline after its
    /// placing, so none is due sooner than that. A quiet shop costs one
    /// index lookup every few seconds rather than a transaction five times
    /// a second.
    pub(crate) async fn run_deadline_sweeper(self, shutdown: CancellationToken) {
        // At most this long between looks, whatever the deadlines say: a
        // replica configured with a shorter saga deadline places orders
        // due sooner than this one expects.
        let longest = self.deadline.min(Duration::from_secs(5));
        loop {
            let wait = match self.next_due().await {
                Ok(Some(due)) if due <= Utc::now() => match self.cancel_overdue().await {
                    Ok(0) => {
                        // Due, but locked by a handler or another sweeper
                        // (`SKIP LOCKED`): theirs to settle; look again soon.
                        Duration::from_millis(100)
                    }
                    Ok(_) => continue,
                    Err(error) => {
                        tracing::warn!(error = %error_chain(&error), "deadline sweep failed");
                        Duration::from_secs(1)
                    }
                },
                Ok(due) => due
                    .and_then(|due| (due - Utc::now()).to_std().ok())
                    .map_or(longest, |until| until.min(longest)),
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "deadline sweep failed");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The earliest deadline of a PENDING order, if any.
    async fn next_due(&self) -> Result<Option<chrono::DateTime<Utc>>, ApiError> {
        let mut conn = self.pool.get().await?;
        Ok(store::earliest_deadline(&mut conn).await?)
    }

    async fn cancel_overdue(&self) -> Result<usize, ApiError> {
        let mut conn = self.pool.get().await?;
        let outbox = self.outbox.clone();
        let cancelled = conn
            .transaction::<_, diesel::result::Error, _>(async |conn| {
                let now = Utc::now();
                let overdue = store::lock_overdue(conn, now).await?;
                let mut cancelled = Vec::with_capacity(overdue.len());
                let mut written = Written::default();
                for order in overdue {
                    let decision = domain::decide(
                        Status::Pending,
                        order.deadline,
                        now,
                        &SagaEvent::DeadlinePassed,
                    );
                    if let Decision::Cancel(reason) = decision {
                        written.extend(
                            cancel(conn, &outbox, order.order_id, order.user_id, &reason).await?,
                        );
                        cancelled.push((reason, order.placed_at));
                    }
                }
                Ok((cancelled, written))
            })
            .await?;
        let (cancelled, written) = cancelled;
        if let Err(error) = self.outbox.publish(written).await {
            tracing::debug!(%error, "cancellations committed, not published; the outbox sweep publishes them");
        }
        for (reason, placed_at) in &cancelled {
            self.metrics.ended(&SagaEnd {
                outcome: "cancelled",
                reason: reason.clone(),
                placed_at: *placed_at,
            });
        }
        Ok(cancelled.len())
    }
}

/// Cancels a PENDING order and writes `order.cancelled` to the outbox.
async fn cancel(
    conn: &mut AsyncPgConnection,
    outbox: &Outbox,
    order_id: Uuid,
    user_id: Uuid,
    reason: &str,
) -> diesel::QueryResult<Written> {
    store::mark_cancelled(conn, order_id, reason).await?;
    store::record_steps(conn, order_id, &[("order.cancelled", reason)]).await?;
    let event = OrderCancelled {
        order_id: order_id.to_string(),
        user_id: user_id.to_string(),
        reason: reason.to_owned(),
    };
    let outgoing = OutgoingEvent::new(&event).correlated(order_id.to_string());
    outbox.append(conn, vec![outgoing]).await
}
