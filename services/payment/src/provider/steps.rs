//! The worker that calls the provider, outside any transaction, and the
//! transactions that settle a payment from an outcome (an answer or a
//! webhook, whichever comes first) and write its event.

use std::sync::Arc;
use std::time::Duration;

use diesel_async::{AsyncConnection as _, AsyncPgConnection};
use pg_jetstream::db::PgPool;
use pg_jetstream::{Outbox, envelope::OutgoingEvent, outbox::Written};
use shop_proto::payment::v1::{PaymentCompleted, PaymentFailed, PaymentRefunded, ProviderTrace};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use super::metrics::ProviderMetrics;
use super::{Outcome, PaymentProvider, ProviderPayment, charge_key, refund_key};
use crate::domain::{self, Charged, PaymentStatus, Settle};
use crate::store;

/// How many payments one look claims.
const CLAIM: i64 = 32;
/// How often the worker looks when nobody woke it: payments whose call
/// failed come due again on their own.
const LOOK_EVERY: Duration = Duration::from_millis(500);
/// How often the unsettled payments are counted for the metrics.
const COUNT_EVERY: Duration = Duration::from_secs(5);

/// The provider's steps: the calls, and what their outcomes settle.
pub(crate) struct Steps<P> {
    pool: PgPool,
    outbox: Outbox,
    provider: P,
    /// How long a call may take (the claim's lease covers it).
    timeout: Duration,
    wake: Notify,
    metrics: ProviderMetrics,
}

impl<P> std::fmt::Debug for Steps<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steps")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A webhook event to record with what it settles, so that a duplicate
/// settles nothing.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Webhook<'a> {
    pub(crate) event_id: &'a str,
    pub(crate) kind: &'a str,
}

/// Why a settlement was not written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SettleError {
    #[error("database: {0}")]
    Database(#[from] diesel::result::Error),
    #[error("no database connection: {0}")]
    Pool(String),
    #[error("the reference {0:?} is no order id")]
    Reference(String),
}

impl<P: PaymentProvider> Steps<P> {
    pub(crate) fn new(
        pool: PgPool,
        outbox: Outbox,
        provider: P,
        timeout: Duration,
        metrics: ProviderMetrics,
    ) -> Self {
        Self {
            pool,
            outbox,
            provider,
            timeout,
            wake: Notify::new(),
            metrics,
        }
    }

    pub(crate) fn metrics(&self) -> &ProviderMetrics {
        &self.metrics
    }

    /// Tells the worker that a payment became due.
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    /// Makes the calls that are due, as they come due, until `shutdown`.
    pub(crate) async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut counted = tokio::time::Instant::now() - COUNT_EVERY;
        loop {
            if counted.elapsed() >= COUNT_EVERY {
                self.count_unsettled().await;
                counted = tokio::time::Instant::now();
            }
            loop {
                let due = match self.claim().await {
                    Ok(due) => due,
                    Err(error) => {
                        tracing::warn!(%error, "cannot claim the provider calls due");
                        break;
                    }
                };
                if due.is_empty() {
                    break;
                }
                futures::future::join_all(due.into_iter().map(|due| {
                    // The call belongs to its saga's trace.
                    let span = tracing::info_span!("provider call", order_id = %due.order_id);
                    pg_jetstream::telemetry::continue_from(&span, due.traceparent.as_deref(), None);
                    self.call(due).instrument(span)
                }))
                .await;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(LOOK_EVERY) => {}
            }
        }
    }

    async fn count_unsettled(&self) {
        let counted = match self.connection().await {
            Ok(mut conn) => store::unsettled(&mut conn).await.map_err(SettleError::from),
            Err(error) => Err(error),
        };
        match counted {
            Ok(rows) => {
                for (state, status) in [("pending", "PENDING"), ("refunding", "REFUNDING")] {
                    let (count, age) = rows
                        .iter()
                        .find(|(stored, _, _)| stored == status)
                        .map_or((0, 0.0), |(_, count, age)| (*count, *age));
                    self.metrics.set_unsettled(state, count, age);
                }
            }
            Err(error) => tracing::debug!(%error, "cannot count the unsettled payments"),
        }
    }

    async fn claim(&self) -> Result<Vec<store::Due>, SettleError> {
        let mut conn = self.connection().await?;
        Ok(store::claim_due(&mut conn, CLAIM, self.timeout.as_secs_f64()).await?)
    }

    async fn connection(
        &self,
    ) -> Result<impl std::ops::DerefMut<Target = AsyncPgConnection>, SettleError> {
        self.pool
            .get()
            .await
            .map_err(|error| SettleError::Pool(error.to_string()))
    }

    /// One call for a claimed payment, and what its outcome settles. An
    /// unknown outcome settles nothing: the payment comes due again and is
    /// called again under the same key.
    async fn call(&self, due: store::Due) {
        let order_id = due.order_id;
        let settled = match PaymentStatus::parse(&due.status) {
            Ok(PaymentStatus::Pending) => {
                let key = charge_key(order_id);
                let started = tokio::time::Instant::now();
                let outcome = self
                    .provider
                    .charge(&key, due.amount_cents, &order_id.to_string())
                    .await;
                self.metrics
                    .call("charge", outcome.label(), started.elapsed().as_secs_f64());
                match outcome {
                    Outcome::Done(payment) => self.settle_charge(&payment, None).await,
                    Outcome::Refused(why) => {
                        tracing::warn!(%order_id, %why, "the provider refused the charge");
                        let reason = format!("the payment provider refused the charge: {why}");
                        self.settle(order_id, None, Charged::Declined(reason), None)
                            .await
                    }
                    Outcome::Unknown(why) => {
                        tracing::warn!(%order_id, attempts = due.attempts, %why, "charge outcome unknown; calling again under the same key");
                        Ok(())
                    }
                }
            }
            Ok(PaymentStatus::Refunding) => {
                let Some(payment_id) = due.provider_payment_id.as_deref() else {
                    tracing::error!(%order_id, "a refund is due for a charge with no provider id");
                    return;
                };
                let started = tokio::time::Instant::now();
                let outcome = self
                    .provider
                    .refund(&refund_key(order_id), payment_id)
                    .await;
                self.metrics
                    .call("refund", outcome.label(), started.elapsed().as_secs_f64());
                match outcome {
                    Outcome::Done(_) => self.settle_refund(order_id, None).await,
                    Outcome::Refused(why) => {
                        // Money is owed: keep trying, loudly.
                        tracing::error!(%order_id, %why, "the provider refused the refund; trying again");
                        Ok(())
                    }
                    Outcome::Unknown(why) => {
                        tracing::warn!(%order_id, attempts = due.attempts, %why, "refund outcome unknown; calling again under the same key");
                        Ok(())
                    }
                }
            }
            other => {
                tracing::error!(%order_id, status = ?other, "claimed a payment with no call due");
                Ok(())
            }
        };
        if let Err(error) = settled {
            // The outcome is not recorded: the payment comes due again and
            // the same key brings the same answer.
            tracing::warn!(%order_id, %error, "cannot record the provider's answer; will ask again");
        }
    }

    /// Settles a payment from the provider's report of its charge.
    pub(crate) async fn settle_charge(
        &self,
        payment: &ProviderPayment,
        webhook: Option<Webhook<'_>>,
    ) -> Result<(), SettleError> {
        let order_id: Uuid = payment
            .reference
            .parse()
            .map_err(|_| SettleError::Reference(payment.reference.clone()))?;
        let charged = match (payment.status.as_str(), payment.decline_code.as_str()) {
            ("succeeded", _) => Charged::Succeeded,
            // Worded as the wallet's refusal is, which the order service
            // and its metrics know as a refusal for funds.
            (_, "insufficient_funds") => {
                Charged::Declined("insufficient funds at the payment provider".into())
            }
            (_, code) => Charged::Declined(format!("declined by the payment provider: {code}")),
        };
        self.settle(
            order_id,
            Some((&payment.id, payment.amount_cents)),
            charged,
            webhook,
        )
        .await
    }

    /// Settles a PENDING payment with `charged`, writing its event, in one
    /// transaction (with the webhook's record, if it came by one); then
    /// publishes. `reported` is the provider's payment id and amount; a
    /// payment of another amount than the intent's settles nothing (the
    /// payment stays PENDING and its alert fires).
    async fn settle(
        &self,
        order_id: Uuid,
        reported: Option<(&str, i64)>,
        charged: Charged,
        webhook: Option<Webhook<'_>>,
    ) -> Result<(), SettleError> {
        let mut conn = self.connection().await?;
        let outbox = &self.outbox;
        let (written, refund_due) = conn
            .transaction::<_, diesel::result::Error, _>(async |conn| {
                if !first_time(conn, webhook).await? {
                    return Ok((Written::default(), false));
                }
                let Some(standing) = store::lock_standing(conn, order_id).await? else {
                    tracing::warn!(%order_id, "the provider reported a charge the shop does not know");
                    return Ok((Written::default(), false));
                };
                if let Some((id, amount)) = reported
                    && amount != standing.amount_cents
                {
                    tracing::error!(%order_id, provider_payment = id, amount, expected = standing.amount_cents,
                        "the provider reports a payment of another amount than the shop asked for; not settled");
                    return Ok((Written::default(), false));
                }
                let status = parse(&standing.status)?;
                let id = reported
                    .map(|(id, _)| id)
                    .or(standing.provider_payment_id.as_deref());
                let trace = trace(id, standing.attempts, webhook);
                match domain::settle(status, standing.cancel_requested, charged) {
                    Settle::Capture => {
                        store::settle(conn, order_id, PaymentStatus::Captured, id, "").await?;
                        let event = PaymentCompleted {
                            order_id: order_id.to_string(),
                            user_id: standing.user_id.to_string(),
                            amount_cents: standing.amount_cents,
                            provider: Some(trace),
                        };
                        Ok((append(outbox, conn, order_id, standing.traceparent.as_deref(), OutgoingEvent::new(&event)).await?, false))
                    }
                    Settle::CaptureToRefund => {
                        store::settle(conn, order_id, PaymentStatus::Refunding, id, "").await?;
                        Ok((Written::default(), true))
                    }
                    Settle::Decline(reason) => {
                        store::settle(conn, order_id, PaymentStatus::Declined, id, &reason).await?;
                        let event = PaymentFailed {
                            order_id: order_id.to_string(),
                            user_id: standing.user_id.to_string(),
                            amount_cents: standing.amount_cents,
                            reason,
                            provider: Some(trace),
                        };
                        Ok((append(outbox, conn, order_id, standing.traceparent.as_deref(), OutgoingEvent::new(&event)).await?, false))
                    }
                    Settle::Nothing => Ok((Written::default(), false)),
                }
            })
            .await?;
        drop(conn);
        if refund_due {
            self.wake();
        }
        self.publish(written).await;
        Ok(())
    }

    /// Settles a REFUNDING payment as refunded, writing `payment.refunded`.
    pub(crate) async fn settle_refund(
        &self,
        order_id: Uuid,
        webhook: Option<Webhook<'_>>,
    ) -> Result<(), SettleError> {
        let mut conn = self.connection().await?;
        let outbox = &self.outbox;
        let written = conn
            .transaction::<_, diesel::result::Error, _>(async |conn| {
                if !first_time(conn, webhook).await? {
                    return Ok(Written::default());
                }
                let Some(standing) = store::lock_standing(conn, order_id).await? else {
                    return Ok(Written::default());
                };
                if parse(&standing.status)? != PaymentStatus::Refunding {
                    return Ok(Written::default());
                }
                let id = standing.provider_payment_id.as_deref();
                store::settle(conn, order_id, PaymentStatus::Refunded, id, "").await?;
                let event = PaymentRefunded {
                    order_id: order_id.to_string(),
                    user_id: standing.user_id.to_string(),
                    amount_cents: standing.amount_cents,
                    provider: Some(trace(id, standing.attempts, webhook)),
                };
                append(
                    outbox,
                    conn,
                    order_id,
                    standing.traceparent.as_deref(),
                    OutgoingEvent::new(&event),
                )
                .await
            })
            .await?;
        drop(conn);
        self.publish(written).await;
        Ok(())
    }

    async fn publish(&self, written: Written) {
        if written.is_empty() {
            return;
        }
        if let Err(error) = self.outbox.publish(written).await {
            tracing::debug!(%error, "settled, not published; the outbox sweep publishes it");
        }
    }
}

/// Records the webhook, if the outcome came by one: `false` when it was
/// recorded before (a duplicate delivery).
async fn first_time(
    conn: &mut AsyncPgConnection,
    webhook: Option<Webhook<'_>>,
) -> diesel::QueryResult<bool> {
    match webhook {
        None => Ok(true),
        Some(webhook) => {
            Ok(store::record_webhook(conn, webhook.event_id, webhook.kind).await? == 1)
        }
    }
}

/// How the provider's outcome was reached, for the event.
fn trace(payment_id: Option<&str>, calls: i32, webhook: Option<Webhook<'_>>) -> ProviderTrace {
    ProviderTrace {
        payment_id: payment_id.unwrap_or_default().to_owned(),
        calls,
        settled_by: if webhook.is_some() {
            "webhook"
        } else {
            "answer"
        }
        .to_owned(),
    }
}

fn parse(status: &str) -> diesel::QueryResult<PaymentStatus> {
    PaymentStatus::parse(status)
        .map_err(|error| diesel::result::Error::DeserializationError(Box::new(error)))
}

/// Writes `event` to the outbox in the saga's trace (`traceparent`, as the
/// intent recorded it), whether the worker or a webhook settled it.
async fn append(
    outbox: &Outbox,
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
    traceparent: Option<&str>,
    event: OutgoingEvent,
) -> diesel::QueryResult<Written> {
    let span = tracing::info_span!("provider outcome", order_id = %order_id);
    pg_jetstream::telemetry::continue_from(&span, traceparent, None);
    outbox
        .append(conn, vec![event.correlated(order_id.to_string())])
        .instrument(span)
        .await
}
