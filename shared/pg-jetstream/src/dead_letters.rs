//! The dead-letter queue as an operator sees it: list, inspect, replay to
//! the consumer that gave up, delete.
//!
//! A replay publishes the original body and headers to
//! `replay.<consumer>.<subject>` on the `REPLAY` stream, which only that
//! consumer's replay durable reads ([`ConsumerSpec::replays`]): the other
//! consumers of the original subject do not see the event again. The
//! consumer's inbox still applies, so replaying an event it has applied since
//! is harmless. Once JetStream has stored the replay, the dead letter is
//! deleted; if the event fails again, it comes back as a new dead letter.
//!
//! [`ConsumerSpec::replays`]: crate::provision::ConsumerSpec::replays

use std::ops::ControlFlow;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::{self, consumer::DeliverPolicy, message::PublishMessage};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt as _;

use crate::consumer::dead_letter_headers;
use crate::envelope::headers;
use crate::provision::Names;

/// Why an operation on the dead-letter queue failed.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// The dead-letter stream does not exist yet.
    #[error("there is no {0} stream on this NATS server: has a service started on it?")]
    NoStream(String),
    /// No dead letter has that sequence.
    #[error("no dead letter #{0} (it may have been replayed or deleted)")]
    NotFound(u64),
    /// A stored message lacks the headers that dead-lettering adds.
    #[error("message #{sequence} is not a dead letter: missing header {header}")]
    NotADeadLetter {
        /// Its sequence in `DLQ`.
        sequence: u64,
        /// The missing header.
        header: &'static str,
    },
    /// JetStream failed.
    #[error("JetStream: {0}")]
    JetStream(String),
}

fn jetstream_error(error: impl std::fmt::Display) -> DeadLetterError {
    DeadLetterError::JetStream(error.to_string())
}

/// One dead letter: the original event and why its consumer gave up on it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Its sequence in the `DLQ` stream, which names it for `show`, `replay`
    /// and `delete`.
    pub sequence: u64,
    /// When it was dead-lettered.
    pub time: DateTime<Utc>,
    /// The durable consumer that gave up on it.
    pub consumer: String,
    /// The subject the event was published on.
    pub subject: String,
    /// The stream it was delivered from, and its sequence there.
    pub stream: String,
    /// Its sequence in `stream`.
    pub stream_sequence: u64,
    /// How many times it had been delivered.
    pub deliveries: i64,
    /// Why it was dead-lettered.
    pub reason: String,
    /// Every header, the original ones and the `dlq-*` ones.
    pub headers: HeaderMap,
    /// The original body.
    pub body: Bytes,
}

impl DeadLetter {
    fn from_stored(
        sequence: u64,
        time: DateTime<Utc>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Self, DeadLetterError> {
        let get = |header: &'static str| {
            headers
                .get(header)
                .map(|value| value.as_str().to_owned())
                .ok_or(DeadLetterError::NotADeadLetter { sequence, header })
        };
        Ok(Self {
            sequence,
            time,
            consumer: get(dead_letter_headers::CONSUMER)?,
            subject: get(dead_letter_headers::SUBJECT)?,
            stream: get(dead_letter_headers::STREAM)?,
            stream_sequence: get(dead_letter_headers::STREAM_SEQUENCE)?
                .parse()
                .unwrap_or(0),
            deliveries: get(dead_letter_headers::DELIVERIES)?.parse().unwrap_or(0),
            reason: get(dead_letter_headers::REASON)?,
            headers,
            body,
        })
    }

    /// A header of the original event, such as `ce-type`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|value| value.as_str())
    }

    /// The headers the event was first published with: without what
    /// dead-lettering added, and without the de-duplication id.
    pub fn original_headers(&self) -> HeaderMap {
        self.headers
            .iter()
            .filter(|(name, _)| {
                let name: &str = name.as_ref();
                !name.starts_with("dlq-") && !name.eq_ignore_ascii_case(headers::NATS_MSG_ID)
            })
            .flat_map(|(name, values)| values.iter().map(move |v| (name.clone(), v.clone())))
            .collect()
    }
}

/// A part of the dead-letter queue.
#[derive(Debug, Clone)]
pub struct DeadLetterPage {
    /// Oldest first.
    pub letters: Vec<DeadLetter>,
    /// The sequence the next page starts from; `None` on the last page.
    pub next: Option<u64>,
}

/// The `DLQ` stream.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
    names: Names,
}

impl DeadLetters {
    /// Opens the `DLQ` stream (under the default [`Names`]).
    pub async fn open(js: jetstream::Context) -> Result<Self, DeadLetterError> {
        Self::open_named(js, Names::default()).await
    }

    /// Opens the dead-letter stream that `names` names.
    pub async fn open_named(js: jetstream::Context, names: Names) -> Result<Self, DeadLetterError> {
        let stream = js
            .get_stream(&names.dead_letter_stream)
            .await
            .map_err(|error| match error.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(inner)
                    if inner.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    DeadLetterError::NoStream(names.dead_letter_stream.clone())
                }
                _ => jetstream_error(error),
            })?;
        Ok(Self { js, stream, names })
    }

    /// Every dead letter, oldest first, all in memory: for small queues
    /// and tests; [`page`](Self::page) reads a large one a part at a time.
    pub async fn list(&self) -> Result<Vec<DeadLetter>, DeadLetterError> {
        let mut letters = Vec::new();
        let mut from = 1;
        loop {
            let page = self.page(from, 1000, None).await?;
            letters.extend(page.letters);
            match page.next {
                Some(next) => from = next,
                None => return Ok(letters),
            }
        }
    }

    /// At most `limit` dead letters from sequence `from` on, oldest first,
    /// only `consumer`'s when given (the server filters by subject), and
    /// where the next page starts when there may be more.
    pub async fn page(
        &self,
        from: u64,
        limit: usize,
        consumer: Option<&str>,
    ) -> Result<DeadLetterPage, DeadLetterError> {
        let limit = limit.max(1);
        let filter = consumer.map(|consumer| self.names.dead_letters_of(consumer));
        let mut kept = 0;
        let messages = read_stream_filtered(
            &self.stream,
            DeliverPolicy::ByStartSequence {
                start_sequence: from.max(1),
            },
            filter,
            |_| {
                // One more than asked for says whether a next page exists.
                if kept > limit {
                    return ControlFlow::Break(());
                }
                kept += 1;
                ControlFlow::Continue(true)
            },
        )
        .await?;
        let mut letters = messages
            .into_iter()
            .map(|message| {
                let info = message.info().map_err(jetstream_error)?;
                let (sequence, time) = (info.stream_sequence, info.published);
                let headers = message.headers.clone().unwrap_or_default();
                DeadLetter::from_stored(sequence, time, headers, message.payload.clone())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let next = if letters.len() > limit {
            let first_of_next = letters.remove(limit);
            letters.truncate(limit);
            Some(first_of_next.sequence)
        } else {
            None
        };
        Ok(DeadLetterPage { letters, next })
    }

    /// The dead letter with this sequence.
    pub async fn get(&self, sequence: u64) -> Result<DeadLetter, DeadLetterError> {
        let stored = self
            .stream
            .get_raw_message(sequence)
            .await
            .map_err(|error| match error.kind() {
                jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                    DeadLetterError::NotFound(sequence)
                }
                _ => jetstream_error(error),
            })?;
        DeadLetter::from_stored(sequence, stored.time, stored.headers, stored.payload)
    }

    /// Hands dead letter `sequence` back to the consumer that gave up on it,
    /// and only to that consumer, then deletes it from the queue; returns it.
    pub async fn replay(&self, sequence: u64) -> Result<DeadLetter, DeadLetterError> {
        let letter = self.get(sequence).await?;
        let mut headers = letter.original_headers();
        // Replaying the same dead letter twice in a row stores one replay.
        headers.insert(
            headers::NATS_MSG_ID,
            format!(
                "replay:{}:{}",
                self.names.dead_letter_stream, letter.sequence
            )
            .as_str(),
        );
        let publish = PublishMessage::build()
            .payload(letter.body.clone())
            .headers(headers);
        self.js
            .send_publish(
                self.names.replay_subject(&letter.consumer, &letter.subject),
                publish,
            )
            .await
            .map_err(jetstream_error)?
            .await
            .map_err(jetstream_error)?;
        self.delete(letter.sequence).await?;
        Ok(letter)
    }

    /// Deletes the dead letter with this sequence.
    pub async fn delete(&self, sequence: u64) -> Result<(), DeadLetterError> {
        match self.stream.delete_message(sequence).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(DeadLetterError::NotFound(sequence)),
            Err(error) => match error.kind() {
                // The server reports a missing message as a failed delete
                // whose description says so.
                jetstream::stream::DeleteMessageErrorKind::JetStream(inner)
                    if inner.error_code() == ErrorCode::STREAM_MESSAGE_DELETE_FAILED
                        && inner.to_string().starts_with("no message found") =>
                {
                    Err(DeadLetterError::NotFound(sequence))
                }
                _ => Err(jetstream_error(error)),
            },
        }
    }
}

/// Reads `stream` from `start` with an ephemeral ordered consumer, up to
/// the last message stored when the read began. `keep` decides per message:
/// `Continue(true)` keeps it, `Continue(false)` skips it, `Break` ends the
/// read.
pub async fn read_stream(
    stream: &jetstream::stream::Stream,
    start: DeliverPolicy,
    keep: impl FnMut(&jetstream::Message) -> ControlFlow<(), bool>,
) -> Result<Vec<jetstream::Message>, DeadLetterError> {
    read_stream_filtered(stream, start, None, keep).await
}

/// [`read_stream`], only the messages on subjects matching `filter`.
pub async fn read_stream_filtered(
    stream: &jetstream::stream::Stream,
    start: DeliverPolicy,
    filter: Option<String>,
    mut keep: impl FnMut(&jetstream::Message) -> ControlFlow<(), bool>,
) -> Result<Vec<jetstream::Message>, DeadLetterError> {
    let mut stream = stream.clone();
    let last = stream
        .info()
        .await
        .map_err(jetstream_error)?
        .state
        .last_sequence;
    let mut kept = Vec::new();
    if last == 0 {
        return Ok(kept);
    }
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: start,
            filter_subject: filter.unwrap_or_default(),
            ..Default::default()
        })
        .await
        .map_err(jetstream_error)?;
    if consumer.cached_info().num_pending == 0 {
        return Ok(kept);
    }
    let mut messages = consumer.messages().await.map_err(jetstream_error)?;
    loop {
        // Messages deleted meanwhile may leave nothing more to deliver.
        let next = tokio::time::timeout(Duration::from_secs(2), messages.next()).await;
        let message = match next {
            Err(_) | Ok(None) => break,
            Ok(Some(message)) => message.map_err(jetstream_error)?,
        };
        let info = message.info().map_err(jetstream_error)?;
        let (sequence, pending) = (info.stream_sequence, info.pending);
        match keep(&message) {
            ControlFlow::Continue(true) => kept.push(message),
            ControlFlow::Continue(false) => {}
            ControlFlow::Break(()) => break,
        }
        if sequence >= last || pending == 0 {
            break;
        }
    }
    Ok(kept)
}
