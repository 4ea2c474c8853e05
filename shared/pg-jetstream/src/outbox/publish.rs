//! Publishing outbox rows: after their writer's commit, by the sweep, or
//! again for a redelivered message whose first delivery did not.

use crate::db::KeepPrepared;
use async_nats::jetstream::{self, message::PublishMessage};
use diesel::QueryResult;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use tracing::Instrument as _;
use uuid::Uuid;

use super::{Row, Written};
use crate::envelope::build_headers;
use crate::metrics::{MessagingMetrics, SubjectLabels};
use crate::trace;

/// JetStream did not take or did not acknowledge an event; its row waits
/// for the relay's sweep.
#[derive(Debug, thiserror::Error)]
#[error("publish to JetStream failed: {0}")]
pub struct PublishError(#[from] jetstream::context::PublishError);

/// Sends every row first, then waits for the acks: one round trip for all.
pub(crate) async fn publish_rows(
    js: &jetstream::Context,
    metrics: &MessagingMetrics,
    rows: &[Row],
) -> Result<(), PublishError> {
    let mut acks = Vec::with_capacity(rows.len());
    for row in rows {
        acks.push(publish_row(js, row).await?);
    }
    for ack in acks {
        ack.await?;
    }
    for row in rows {
        metrics
            .published
            .get_or_create(&SubjectLabels {
                subject: row.subject.clone(),
            })
            .inc();
    }
    Ok(())
}

/// Sends one row under a producer span that continues the writer's trace.
async fn publish_row(
    js: &jetstream::Context,
    row: &Row,
) -> Result<jetstream::context::PublishAckFuture, PublishError> {
    let span = tracing::info_span!(
        "publish",
        otel.name = format!("{} publish", row.subject),
        otel.kind = "producer",
        pg_jetstream.service = crate::trace::service_of(&row.source),
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
    Ok(js
        .send_publish(row.subject.clone(), message)
        .instrument(span)
        .await?)
}

/// The rows still in the outbox that the events `causes` emitted, in the
/// order written: what a redelivered message publishes again before it is
/// acknowledged, in case its first delivery died between commit and publish.
pub(crate) async fn unconfirmed_caused_by(
    conn: &mut AsyncPgConnection,
    causes: &[Uuid],
) -> QueryResult<Written> {
    if causes.is_empty() {
        return Ok(Written::default());
    }
    let rows = KeepPrepared(
        diesel::sql_query(
            "SELECT event_id, subject, event_type, source, payload, correlation_id, \
             causation_id, traceparent, tracestate, created_at \
             FROM outbox WHERE causation_id = ANY($1) ORDER BY seq",
        )
        .bind::<diesel::sql_types::Array<diesel::sql_types::Uuid>, _>(causes),
    )
    .load(conn)
    .await?;
    Ok(Written { rows })
}
