//! One saga's timeline across the services, read from the streams.
//!
//! Every event of a saga carries the order id as its correlation id. Order
//! ids are UUIDv7, so the saga cannot have begun before the id's timestamp:
//! each stream is read from just before it, and for a window after it,
//! which keeps the read short on a long stream. Dead letters keep the
//! original headers, so the same reading finds them in `DLQ`.

use std::ops::ControlFlow;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::{self, ErrorCode, consumer::DeliverPolicy};
use chrono::{DateTime, Utc};
use pg_jetstream::consumer::dead_letter_headers;
use pg_jetstream::dead_letters::read_stream;
use pg_jetstream::envelope::headers;
use uuid::Uuid;

use crate::events::describe;

/// The streams a saga's events and dead letters are on.
const STREAMS: [&str; 4] = ["ORDER", "INVENTORY", "PAYMENT", "DLQ"];

/// A saga's events and dead letters, in the order they happened.
#[derive(Debug)]
pub struct Timeline {
    /// The order id, which is the saga's correlation id.
    pub order_id: String,
    /// Its steps, oldest first.
    pub steps: Vec<Step>,
}

/// One event of a saga, or one dead letter.
#[derive(Debug)]
pub struct Step {
    /// When the event was written, or when the dead letter was filed.
    pub time: DateTime<Utc>,
    /// The service that wrote the event, e.g. `inventory`.
    pub service: String,
    /// The subject the event was published on.
    pub subject: String,
    /// The event's `ce-type`.
    pub event_type: String,
    /// Its key fields, for people.
    pub detail: String,
    /// The W3C trace id its `traceparent` carries: the saga's trace.
    pub trace_id: Option<String>,
    /// Set when this step is a dead letter.
    pub dead_letter: Option<DeadLetterStep>,
}

/// A consumer that gave up on one of the saga's events.
#[derive(Debug)]
pub struct DeadLetterStep {
    /// The consumer, e.g. `inventory`.
    pub consumer: String,
    /// Why it gave up.
    pub reason: String,
    /// The dead letter's number in `DLQ`.
    pub sequence: u64,
}

/// How a saga ended, as far as its events tell.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `order.confirmed` was published.
    Confirmed,
    /// `order.cancelled` was published, with this detail.
    Cancelled(String),
    /// Neither yet; the subject of the last event, if there is one.
    NotEnded(Option<String>),
}

impl Timeline {
    /// Reads the saga of `order_id` from the streams, looking `window` past
    /// the moment the order id was made (from the start of the streams when
    /// the id is not a UUIDv7).
    pub async fn read(
        js: &jetstream::Context,
        order_id: Uuid,
        window: Duration,
    ) -> anyhow::Result<Self> {
        let bounds = match order_id.get_timestamp() {
            Some(timestamp) => {
                let (seconds, nanos) = timestamp.to_unix();
                let placed = DateTime::from_timestamp(i64::try_from(seconds)?, nanos)
                    .context("the order id's timestamp is out of range")?;
                // Clocks of different machines differ a little.
                Some((placed - Duration::from_secs(5), placed + window))
            }
            None => None,
        };
        let correlation_id = order_id.to_string();
        let mut steps = Vec::new();
        for name in STREAMS {
            let stream = match js.get_stream(name).await {
                Ok(stream) => stream,
                // A stream nobody created yet holds no step of this saga.
                Err(error)
                    if matches!(error.kind(), GetStreamErrorKind::JetStream(inner)
                        if inner.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
                {
                    continue;
                }
                Err(error) => return Err(error).with_context(|| format!("opening {name}")),
            };
            let from = bounds.map_or(DeliverPolicy::All, |(start_time, _)| {
                DeliverPolicy::ByStartTime { start_time }
            });
            let messages = read_stream(&stream, from, |message| {
                if let (Some((_, end)), Ok(info)) = (bounds, message.info())
                    && info.published > end
                {
                    return ControlFlow::Break(());
                }
                let correlated = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(headers::CORRELATION_ID))
                    .is_some_and(|id| id.as_str() == correlation_id);
                ControlFlow::Continue(correlated)
            })
            .await
            .with_context(|| format!("reading {name}"))?;
            steps.extend(messages.iter().filter_map(step));
        }
        steps.sort_by_key(|step| step.time);
        Ok(Self {
            order_id: correlation_id,
            steps,
        })
    }

    /// How the saga ended, or that it has not.
    pub fn outcome(&self) -> Outcome {
        let events = || self.steps.iter().filter(|step| step.dead_letter.is_none());
        let end = events().rev().find(|step| {
            matches!(
                step.event_type.as_str(),
                "shop.order.v1.OrderConfirmed" | "shop.order.v1.OrderCancelled"
            )
        });
        match end {
            Some(end) if end.event_type == "shop.order.v1.OrderConfirmed" => Outcome::Confirmed,
            Some(end) => Outcome::Cancelled(end.detail.clone()),
            None => Outcome::NotEnded(events().next_back().map(|step| step.subject.clone())),
        }
    }

    /// The saga's trace id (what Jaeger finds it by): the one its first
    /// event carries, which the later ones continue.
    pub fn trace_id(&self) -> Option<&str> {
        self.steps.iter().find_map(|step| step.trace_id.as_deref())
    }

    /// The saga's dead letters.
    pub fn dead_letters(&self) -> impl Iterator<Item = &DeadLetterStep> {
        self.steps
            .iter()
            .filter_map(|step| step.dead_letter.as_ref())
    }
}

fn step(message: &jetstream::Message) -> Option<Step> {
    let headers = message.headers.as_ref()?;
    let get = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
    let info = message.info().ok()?;
    let event_type = get(headers::TYPE).unwrap_or_default();
    let dead_letter = get(dead_letter_headers::CONSUMER).map(|consumer| DeadLetterStep {
        consumer,
        reason: get(dead_letter_headers::REASON).unwrap_or_default(),
        sequence: info.stream_sequence,
    });
    // A dead letter is placed when it was filed; an event when it was written.
    let time = match &dead_letter {
        Some(_) => info.published,
        None => get(headers::TIME)
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map_or(info.published, |t| t.with_timezone(&Utc)),
    };
    let source = get(headers::SOURCE).unwrap_or_default();
    Some(Step {
        time,
        service: source.strip_prefix("shop/").unwrap_or(&source).to_owned(),
        subject: get(dead_letter_headers::SUBJECT).unwrap_or_else(|| message.subject.to_string()),
        detail: describe(&event_type, &message.payload),
        event_type,
        trace_id: get(headers::TRACEPARENT).and_then(|value| trace_id(&value)),
        dead_letter,
    })
}

/// The trace id of a W3C `traceparent` (`00-<trace id>-<span id>-<flags>`),
/// unless it is malformed or all zeros (no trace).
fn trace_id(traceparent: &str) -> Option<String> {
    let mut parts = traceparent.split('-');
    let (_version, id) = (parts.next()?, parts.next()?);
    let valid = id.len() == 32
        && id.bytes().all(|b| b.is_ascii_hexdigit())
        && id.bytes().any(|b| b != b'0');
    valid.then(|| id.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::trace_id;

    #[test]
    fn a_traceparent_gives_its_trace_id() {
        assert_eq!(
            trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f35-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
        ] {
            assert_eq!(trace_id(bad), None, "{bad:?}");
        }
    }
}
