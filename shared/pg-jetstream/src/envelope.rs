//! The wire format of an event: the protobuf message is the body, and the
//! headers follow CloudEvents' binary content mode.
//!
//! | header | meaning |
//! |---|---|
//! | `ce-specversion` | `1.0` |
//! | `ce-id` | a UUIDv7, also `Nats-Msg-Id` so JetStream drops a re-published copy |
//! | `ce-type` | the protobuf message's full name, e.g. `travel.booking.v1.TicketBooked` |
//! | `ce-source` | the producing service, e.g. `travel/booking` |
//! | `ce-time` | when the event was written, RFC 3339 |
//! | `ce-correlationid` | the saga's id (the order id) |
//! | `ce-causationid` | the `ce-id` of the event that caused this one |
//! | `traceparent`, `tracestate` | the W3C trace context of the writer |
//! | `content-type` | `application/protobuf` |

use crate::Event;
use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use uuid::Uuid;

/// Header names.
pub mod headers {
    /// CloudEvents spec version.
    pub const SPEC_VERSION: &str = "ce-specversion";
    /// CloudEvents id.
    pub const ID: &str = "ce-id";
    /// CloudEvents type: the protobuf message's full name.
    pub const TYPE: &str = "ce-type";
    /// CloudEvents source: the producing service.
    pub const SOURCE: &str = "ce-source";
    /// CloudEvents time.
    pub const TIME: &str = "ce-time";
    /// CloudEvents extension: the saga's correlation id.
    pub const CORRELATION_ID: &str = "ce-correlationid";
    /// CloudEvents extension: the id of the causing event.
    pub const CAUSATION_ID: &str = "ce-causationid";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace state.
    pub const TRACESTATE: &str = "tracestate";
    /// The body's media type.
    pub const CONTENT_TYPE: &str = "content-type";
    /// JetStream's de-duplication id.
    pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
}

/// The CloudEvents spec version this runtime speaks.
pub const SPEC_VERSION: &str = "1.0";
const CONTENT_TYPE: &str = "application/protobuf";

/// Why a message is not a valid event envelope. Always permanent: the same
/// bytes will never decode, so such a message goes to the dead-letter queue.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// A required header is absent.
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    /// A header is present but malformed.
    #[error("header {name} is invalid: {value:?}")]
    InvalidHeader {
        /// The header.
        name: &'static str,
        /// What it held.
        value: String,
    },
    /// The body is not the protobuf message that `ce-type` names.
    #[error("body is not a valid {event_type}: {source}")]
    Body {
        /// The `ce-type` the body claimed to be.
        event_type: String,
        /// The decoding error.
        #[source]
        source: prost::DecodeError,
    },
    /// The envelope holds another type than the one asked for.
    #[error("expected {expected}, got {actual}")]
    WrongType {
        /// The type asked for.
        expected: &'static str,
        /// The envelope's `ce-type`.
        actual: String,
    },
}

/// An event to write to the outbox: its body and the ids that tie it to a
/// saga. The event id, time, source and trace context are added when it is
/// written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingEvent {
    /// The subject to publish on.
    pub subject: &'static str,
    /// The `ce-type`.
    pub event_type: &'static str,
    /// The encoded protobuf body.
    pub payload: Vec<u8>,
    /// The saga's id, if the event belongs to one.
    pub correlation_id: Option<String>,
    /// The id of the event that caused this one.
    pub causation_id: Option<Uuid>,
}

impl OutgoingEvent {
    /// Encodes `event` for its subject.
    pub fn new<E: Event>(event: &E) -> Self {
        Self {
            subject: E::SUBJECT,
            event_type: E::TYPE,
            payload: event.encode_to_vec(),
            correlation_id: None,
            causation_id: None,
        }
    }

    /// Ties the event to a saga.
    #[must_use]
    pub fn correlated(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    /// Records the event that caused this one.
    #[must_use]
    pub fn caused_by(mut self, event_id: Uuid) -> Self {
        self.causation_id = Some(event_id);
        self
    }
}

/// A received event: the headers parsed, the body not yet decoded.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// `ce-id`.
    pub id: Uuid,
    /// `ce-type`.
    pub event_type: String,
    /// `ce-source`.
    pub source: String,
    /// `ce-time`.
    pub time: DateTime<Utc>,
    /// The subject it arrived on.
    pub subject: String,
    /// `ce-correlationid`.
    pub correlation_id: Option<String>,
    /// `ce-causationid`.
    pub causation_id: Option<Uuid>,
    /// `traceparent`.
    pub traceparent: Option<String>,
    /// `tracestate`.
    pub tracestate: Option<String>,
    /// The protobuf body.
    pub body: Bytes,
}

impl Envelope {
    /// Parses the headers of a received message.
    pub fn parse(
        subject: &str,
        headers: Option<&HeaderMap>,
        body: Bytes,
    ) -> Result<Self, EnvelopeError> {
        let empty = HeaderMap::new();
        let headers = headers.unwrap_or(&empty);
        let get = |name: &'static str| headers.get(name).map(|value| value.as_str().to_owned());
        let required = |name: &'static str| {
            get(name)
                .filter(|v| !v.is_empty())
                .ok_or(EnvelopeError::MissingHeader(name))
        };

        let spec = required(headers::SPEC_VERSION)?;
        if spec != SPEC_VERSION {
            return Err(EnvelopeError::InvalidHeader {
                name: headers::SPEC_VERSION,
                value: spec,
            });
        }
        let id = required(headers::ID)?;
        let id = Uuid::parse_str(&id).map_err(|_| EnvelopeError::InvalidHeader {
            name: headers::ID,
            value: id,
        })?;
        let time = required(headers::TIME)?;
        let time = DateTime::parse_from_rfc3339(&time)
            .map_err(|_| EnvelopeError::InvalidHeader {
                name: headers::TIME,
                value: time,
            })?
            .with_timezone(&Utc);
        let causation_id = match get(headers::CAUSATION_ID).filter(|v| !v.is_empty()) {
            None => None,
            Some(value) => {
                Some(
                    Uuid::parse_str(&value).map_err(|_| EnvelopeError::InvalidHeader {
                        name: headers::CAUSATION_ID,
                        value,
                    })?,
                )
            }
        };
        Ok(Self {
            id,
            event_type: required(headers::TYPE)?,
            source: required(headers::SOURCE)?,
            time,
            subject: subject.to_owned(),
            correlation_id: get(headers::CORRELATION_ID).filter(|v| !v.is_empty()),
            causation_id,
            traceparent: get(headers::TRACEPARENT),
            tracestate: get(headers::TRACESTATE),
            body,
        })
    }

    /// Decodes the body as `E`, checking that `ce-type` names `E`.
    pub fn decode<E: Event>(&self) -> Result<E, EnvelopeError> {
        if self.event_type != E::TYPE {
            return Err(EnvelopeError::WrongType {
                expected: E::TYPE,
                actual: self.event_type.clone(),
            });
        }
        E::decode(self.body.clone()).map_err(|source| EnvelopeError::Body {
            event_type: self.event_type.clone(),
            source,
        })
    }
}

impl OutgoingEvent {
    /// The headers this event is published with as `id` from `source`, now,
    /// without trace context. The relay builds its own from the outbox row;
    /// this is for tools that publish directly, such as replays and tests.
    pub fn headers(&self, id: Uuid, source: &str) -> HeaderMap {
        build_headers(
            id,
            self.event_type,
            source,
            Utc::now(),
            self.correlation_id.as_deref(),
            self.causation_id,
            None,
            None,
        )
    }
}

/// Publishes `event` straight to JetStream as `source`, bypassing the
/// outbox, and waits for the ack; returns its `ce-id`. For tools (replays)
/// and tests: a service publishes through its outbox.
pub async fn publish_direct(
    js: &async_nats::jetstream::Context,
    event: &OutgoingEvent,
    source: &str,
) -> Result<Uuid, async_nats::jetstream::context::PublishError> {
    let id = Uuid::now_v7();
    js.publish_with_headers(
        event.subject,
        event.headers(id, source),
        event.payload.clone().into(),
    )
    .await?
    .await?;
    Ok(id)
}

/// The headers of an event as published; see the module's table.
#[allow(clippy::too_many_arguments)]
pub(crate) fn build_headers(
    id: Uuid,
    event_type: &str,
    source: &str,
    time: DateTime<Utc>,
    correlation_id: Option<&str>,
    causation_id: Option<Uuid>,
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let id = id.to_string();
    headers.insert(headers::NATS_MSG_ID, id.as_str());
    headers.insert(headers::SPEC_VERSION, SPEC_VERSION);
    headers.insert(headers::ID, id.as_str());
    headers.insert(headers::TYPE, event_type);
    headers.insert(headers::SOURCE, source);
    headers.insert(
        headers::TIME,
        time.to_rfc3339_opts(SecondsFormat::Micros, true).as_str(),
    );
    headers.insert(headers::CONTENT_TYPE, CONTENT_TYPE);
    if let Some(correlation_id) = correlation_id {
        headers.insert(headers::CORRELATION_ID, correlation_id);
    }
    if let Some(causation_id) = causation_id {
        headers.insert(headers::CAUSATION_ID, causation_id.to_string().as_str());
    }
    if let Some(traceparent) = traceparent {
        headers.insert(headers::TRACEPARENT, traceparent);
    }
    if let Some(tracestate) = tracestate.filter(|state| !state.is_empty()) {
        headers.insert(headers::TRACESTATE, tracestate);
    }
    headers
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    #[derive(Clone, PartialEq, prost::Message)]
    struct Seat {
        #[prost(string, tag = "1")]
        seat: String,
        #[prost(int32, tag = "2")]
        quantity: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct TicketBooked {
        #[prost(string, tag = "1")]
        booking_id: String,
        #[prost(string, tag = "2")]
        customer_id: String,
        #[prost(message, repeated, tag = "3")]
        seats: Vec<Seat>,
    }

    impl Event for TicketBooked {
        const TYPE: &'static str = "example.booking.v1.TicketBooked";
        const SUBJECT: &'static str = "ticket.booked";
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct SeatPaid {
        #[prost(string, tag = "1")]
        booking_id: String,
    }

    impl Event for SeatPaid {
        const TYPE: &'static str = "example.billing.v1.SeatPaid";
        const SUBJECT: &'static str = "seat.paid";
    }

    fn booked() -> TicketBooked {
        TicketBooked {
            booking_id: "b-1".into(),
            customer_id: "c-1".into(),
            seats: vec![Seat {
                seat: "12A".into(),
                quantity: 3,
            }],
        }
    }

    #[test]
    fn headers_round_trip_into_an_envelope() {
        let id = Uuid::now_v7();
        let cause = Uuid::now_v7();
        let time = Utc::now();
        let outgoing = OutgoingEvent::new(&booked())
            .correlated("b-1")
            .caused_by(cause);
        let headers = build_headers(
            id,
            outgoing.event_type,
            "example/order",
            time,
            outgoing.correlation_id.as_deref(),
            outgoing.causation_id,
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            None,
        );
        assert_eq!(
            headers.get(headers::NATS_MSG_ID).unwrap().as_str(),
            id.to_string()
        );

        let envelope =
            Envelope::parse("ticket.booked", Some(&headers), outgoing.payload.into()).unwrap();
        assert_eq!(envelope.id, id);
        assert_eq!(envelope.event_type, "example.booking.v1.TicketBooked");
        assert_eq!(envelope.source, "example/order");
        assert_eq!(envelope.time.timestamp_micros(), time.timestamp_micros());
        assert_eq!(envelope.correlation_id.as_deref(), Some("b-1"));
        assert_eq!(envelope.causation_id, Some(cause));
        assert!(
            envelope
                .traceparent
                .as_deref()
                .unwrap()
                .starts_with("00-0af7")
        );
        assert_eq!(envelope.decode::<TicketBooked>().unwrap(), booked());
    }

    #[test]
    fn decoding_as_another_type_is_refused() {
        let headers = build_headers(
            Uuid::now_v7(),
            TicketBooked::TYPE,
            "example/order",
            Utc::now(),
            None,
            None,
            None,
            None,
        );
        let envelope = Envelope::parse(
            "ticket.booked",
            Some(&headers),
            booked().encode_to_vec().into(),
        )
        .unwrap();
        let error = envelope.decode::<SeatPaid>().unwrap_err();
        assert!(matches!(error, EnvelopeError::WrongType { .. }), "{error}");
    }

    #[test]
    fn missing_or_malformed_headers_are_named() {
        let error = Envelope::parse("ticket.booked", None, Bytes::new()).unwrap_err();
        assert_eq!(error.to_string(), "missing header ce-specversion");

        let mut headers = build_headers(
            Uuid::now_v7(),
            TicketBooked::TYPE,
            "example/order",
            Utc::now(),
            None,
            None,
            None,
            None,
        );
        headers.insert(headers::ID, "not-a-uuid");
        let error = Envelope::parse("ticket.booked", Some(&headers), Bytes::new()).unwrap_err();
        assert_eq!(error.to_string(), "header ce-id is invalid: \"not-a-uuid\"");
    }

    #[test]
    fn garbage_body_is_a_body_error() {
        let headers = build_headers(
            Uuid::now_v7(),
            TicketBooked::TYPE,
            "example/order",
            Utc::now(),
            None,
            None,
            None,
            None,
        );
        let envelope = Envelope::parse(
            "ticket.booked",
            Some(&headers),
            Bytes::from_static(&[0xff, 0xff, 0xff]),
        )
        .unwrap();
        assert!(matches!(
            envelope.decode::<TicketBooked>(),
            Err(EnvelopeError::Body { .. })
        ));
    }
}
