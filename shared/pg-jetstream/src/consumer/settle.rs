//! Settling a message after its batch: ack, nak with the retry policy's
//! delay, or dead-letter it (stored first, only then terminated).

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, message::PublishMessage};

use super::batch::Outcome;
use super::failure::Failure;
use super::{Inner, Processed};
use crate::metrics::{ConsumedLabels, HandlerLabels};

/// Headers a dead letter adds to the original's.
pub mod dead_letter_headers {
    /// Why the message was dead-lettered.
    pub const REASON: &str = "dlq-reason";
    /// The durable consumer that gave up on it.
    pub const CONSUMER: &str = "dlq-consumer";
    /// How many times it had been delivered.
    pub const DELIVERIES: &str = "dlq-delivery-count";
    /// The stream it came from.
    pub const STREAM: &str = "dlq-stream";
    /// Its sequence in that stream.
    pub const STREAM_SEQUENCE: &str = "dlq-stream-sequence";
    /// The subject it was published on.
    pub const SUBJECT: &str = "dlq-subject";
}

impl<S: Send + Sync + 'static> Inner<S> {
    /// Acks, naks or dead-letters a message after its batch. A message
    /// applied (or applied before) whose events are not all in JetStream
    /// (`events_out` false) is left unacknowledged: its redelivery after the
    /// ack wait publishes them. A retryable failure is dead-lettered once
    /// its handler has failed `max_deliver` times (`failures`, counted in
    /// the database; `None` when they could not be counted: retried).
    pub(super) async fn settle(
        &self,
        message: &jetstream::Message,
        outcome: Result<Outcome, Failure>,
        elapsed: Duration,
        events_out: bool,
        failures: Option<i64>,
    ) {
        let (delivered, stream, sequence) = match message.info() {
            Ok(info) => (info.delivered, info.stream.to_owned(), info.stream_sequence),
            Err(error) => {
                tracing::error!(consumer = %self.name, error = %error, "message without JetStream metadata");
                return;
            }
        };
        let (ack, processed) = match outcome {
            Ok(Outcome::Applied) => {
                self.stats.applied.fetch_add(1, Ordering::Relaxed);
                (AckKind::Ack, Processed::Applied)
            }
            Ok(Outcome::Duplicate) => {
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                (AckKind::Ack, Processed::Duplicate)
            }
            Ok(Outcome::Ignored) => {
                self.stats.ignored.fetch_add(1, Ordering::Relaxed);
                (AckKind::Ack, Processed::Ignored)
            }
            Err(Failure::Retryable(reason))
                if failures.is_none_or(|failures| failures < self.retry.max_deliver) =>
            {
                let delay = self.retry.delay(failures.unwrap_or(delivered));
                let (order_id, trace_id) = saga_ids(message);
                tracing::warn!(consumer = %self.name, subject = %message.subject, order_id, trace_id, delivered, failures, ?delay, %reason, "handler failed; retrying");
                self.stats.retried.fetch_add(1, Ordering::Relaxed);
                (AckKind::Nak(Some(delay)), Processed::Retried)
            }
            Err(Failure::Retryable(reason)) => {
                let failures = failures.unwrap_or(delivered);
                let reason = format!("gave up after {failures} failed attempts: {reason}");
                self.dead_letter(message, &reason, delivered, &stream, sequence)
                    .await
            }
            Err(Failure::Permanent(reason)) => {
                self.dead_letter(message, &reason, delivered, &stream, sequence)
                    .await
            }
        };
        self.observe(message, processed, elapsed);
        if let Some(hook) = &self.hook {
            hook(message, processed, elapsed);
        }
        if matches!(processed, Processed::Applied | Processed::Duplicate) && !events_out {
            return;
        }
        if let Err(error) = message.ack_with(ack).await {
            // The message comes back after the ack wait; the inbox makes
            // that harmless.
            tracing::warn!(consumer = %self.name, error = %error, "acknowledgement failed");
        }
    }

    fn observe(&self, message: &jetstream::Message, processed: Processed, elapsed: Duration) {
        let subject = self
            .names
            .original_subject(&self.name, &message.subject)
            .to_owned();
        let outcome = match processed {
            Processed::Applied => "ok",
            Processed::Duplicate => "duplicate",
            Processed::Ignored => "ignored",
            Processed::Retried => "retried",
            Processed::DeadLettered => "dead_lettered",
        };
        if processed == Processed::Applied {
            self.metrics
                .handling
                .get_or_create(&HandlerLabels {
                    consumer: self.name.clone(),
                    subject: subject.clone(),
                })
                .observe(elapsed.as_secs_f64());
        }
        self.metrics
            .consumed
            .get_or_create(&ConsumedLabels {
                consumer: self.name.clone(),
                subject,
                outcome,
            })
            .inc();
    }

    /// Publishes the message to `dlq.<consumer>.<subject>` and returns how to
    /// settle the original: terminate it once the dead letter is stored, or
    /// retry later if even that failed, so that it is never lost.
    async fn dead_letter(
        &self,
        message: &jetstream::Message,
        reason: &str,
        delivered: i64,
        stream: &str,
        sequence: u64,
    ) -> (AckKind, Processed) {
        let mut headers = message.headers.clone().unwrap_or_default();
        // Dead-lettering the same delivery twice (a crash before the
        // terminate) stores one dead letter.
        headers.insert(
            crate::envelope::headers::NATS_MSG_ID,
            format!("{}:{stream}:{sequence}", self.name).as_str(),
        );
        headers.insert(dead_letter_headers::REASON, single_line(reason).as_str());
        headers.insert(dead_letter_headers::CONSUMER, self.name.as_str());
        headers.insert(
            dead_letter_headers::DELIVERIES,
            delivered.to_string().as_str(),
        );
        headers.insert(dead_letter_headers::STREAM, stream);
        headers.insert(
            dead_letter_headers::STREAM_SEQUENCE,
            sequence.to_string().as_str(),
        );
        // A replayed message that fails again is filed under its first subject.
        let original = self.names.original_subject(&self.name, &message.subject);
        headers.insert(dead_letter_headers::SUBJECT, original);
        let subject = self.names.dead_letter_subject(&self.name, original);
        let publish = PublishMessage::build()
            .payload(message.payload.clone())
            .headers(headers);
        let stored = match self.js.send_publish(subject.clone(), publish).await {
            Ok(ack) => ack.await.map(drop).map_err(|error| error.to_string()),
            Err(error) => Err(error.to_string()),
        };
        match stored {
            Ok(()) => {
                self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                let (order_id, trace_id) = saga_ids(message);
                tracing::error!(consumer = %self.name, %subject, order_id, trace_id, sequence, delivered, %reason, "message dead-lettered");
                (AckKind::Term, Processed::DeadLettered)
            }
            Err(error) => {
                let (order_id, trace_id) = saga_ids(message);
                tracing::error!(consumer = %self.name, %subject, order_id, trace_id, %error, "cannot store the dead letter; will retry");
                (AckKind::Nak(Some(self.retry.max)), Processed::Retried)
            }
        }
    }
}

/// The saga's order id and trace id from a message's headers, for the log
/// lines written outside its processing span; empty when absent.
fn saga_ids(message: &jetstream::Message) -> (&str, &str) {
    let header = |name: &str| {
        message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(name))
            .map_or("", |value| value.as_str())
    };
    let trace_id = header(crate::envelope::headers::TRACEPARENT)
        .split('-')
        .nth(1)
        .unwrap_or_default();
    (header(crate::envelope::headers::CORRELATION_ID), trace_id)
}

/// Header values cannot hold line breaks.
fn single_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_reason_stays_on_one_line() {
        assert_eq!(single_line("bad\r\nthing\nhere"), "bad  thing here");
    }
}
