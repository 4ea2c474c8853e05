//! Idempotent set-up of the JetStream objects a service needs, run at
//! start-up by every replica: creating what is missing and updating what
//! changed, so a new configuration takes effect on the next deploy.

use std::time::{Duration, Instant};

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::CreateStreamErrorKind;
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::jetstream::{self, consumer, stream};

/// The default dead-letter stream ([`Names::dead_letter_stream`]).
pub const DLQ_STREAM: &str = "DLQ";

/// The default stream of replayed dead letters ([`Names::replay_stream`]).
pub const REPLAY_STREAM: &str = "REPLAY";

/// The names of what a system's services share: the stream their dead
/// letters go to and the one replayed dead letters come back on, and the
/// first token of each one's subjects. Every service and operator tool of
/// one NATS account must use the same; the defaults are `DLQ` on
/// `dlq.<consumer>.<subject>` and `REPLAY` on `replay.<consumer>.<subject>`.
///
/// ```
/// let names = pg_jetstream::provision::Names {
///     dead_letter_stream: "TRAVEL_DLQ".into(),
///     dead_letter_prefix: "travel-dlq".into(),
///     ..Default::default()
/// };
/// assert_eq!(
///     names.dead_letter_subject("billing", "ticket.booked"),
///     "travel-dlq.billing.ticket.booked"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The stream every dead letter goes to.
    pub dead_letter_stream: String,
    /// The first token of its subjects, `<prefix>.<consumer>.<subject>`.
    pub dead_letter_prefix: String,
    /// The stream replayed dead letters go to, each read only by the
    /// replay durable of the consumer that gave up on it.
    pub replay_stream: String,
    /// The first token of its subjects, `<prefix>.<consumer>.<subject>`.
    pub replay_prefix: String,
}

impl Default for Names {
    fn default() -> Self {
        Self {
            dead_letter_stream: DLQ_STREAM.to_owned(),
            dead_letter_prefix: "dlq".to_owned(),
            replay_stream: REPLAY_STREAM.to_owned(),
            replay_prefix: "replay".to_owned(),
        }
    }
}

impl Names {
    /// Where `consumer`'s dead letter first published on `subject` goes.
    pub fn dead_letter_subject(&self, consumer: &str, subject: &str) -> String {
        format!("{}.{consumer}.{subject}", self.dead_letter_prefix)
    }

    /// The subjects of `consumer`'s dead letters.
    pub fn dead_letters_of(&self, consumer: &str) -> String {
        format!("{}.{consumer}.>", self.dead_letter_prefix)
    }

    /// Where a dead letter of `consumer` first published on `subject` is
    /// replayed.
    pub fn replay_subject(&self, consumer: &str, subject: &str) -> String {
        format!("{}.{consumer}.{subject}", self.replay_prefix)
    }

    /// The subject a message received by `consumer` was first published
    /// on: the subject itself, or for a replay the part after
    /// `<replay prefix>.<consumer>.`.
    pub(crate) fn original_subject<'s>(&self, consumer: &str, received: &'s str) -> &'s str {
        received
            .strip_prefix(self.replay_prefix.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|rest| rest.strip_prefix(consumer))
            .and_then(|rest| rest.strip_prefix('.'))
            .unwrap_or(received)
    }

    /// The dead-letter stream, kept for 30 days, at most
    /// [`SHARED_STREAM_MAX_BYTES`].
    pub fn dead_letter_stream_spec(&self) -> StreamSpec {
        StreamSpec {
            max_age: Duration::from_secs(30 * 24 * 3600),
            max_bytes: SHARED_STREAM_MAX_BYTES,
            ..StreamSpec::new(self.dead_letter_stream.clone(), &self.dead_letter_prefix)
        }
    }

    /// The stream of replayed dead letters, kept for 7 days, at most
    /// [`SHARED_STREAM_MAX_BYTES`].
    pub fn replay_stream_spec(&self) -> StreamSpec {
        StreamSpec {
            max_bytes: SHARED_STREAM_MAX_BYTES,
            ..StreamSpec::new(self.replay_stream.clone(), &self.replay_prefix)
        }
    }

    /// The durable that gives `durable_name` the dead letters replayed to
    /// it, and only those: `durable_name` on the replay stream, filtered
    /// on `<replay prefix>.<durable_name>.>`.
    pub fn replay_consumer(&self, durable_name: &str) -> ConsumerSpec {
        ConsumerSpec::new(
            durable_name,
            self.replay_stream.clone(),
            &[&format!("{}.{durable_name}.>", self.replay_prefix)],
        )
    }
}

/// Where a dead letter of `consumer` first published on `subject` is
/// replayed, under the default [`Names`].
pub fn replay_subject(consumer: &str, subject: &str) -> String {
    Names::default().replay_subject(consumer, subject)
}

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The stream could not be created or updated.
    #[error("cannot provision stream {name}: {source}")]
    Stream {
        /// The stream.
        name: String,
        /// JetStream's answer.
        #[source]
        source: jetstream::context::CreateStreamError,
    },
    /// The consumer could not be created or updated.
    #[error("cannot provision consumer {name} on {stream}: {source}")]
    Consumer {
        /// The durable consumer.
        name: String,
        /// Its stream.
        stream: String,
        /// JetStream's answer.
        #[source]
        source: jetstream::stream::ConsumerError,
    },
}

impl ProvisionError {
    /// Whether the same request may succeed a moment later: JetStream did
    /// not answer in time, or answered that it cannot serve or place it yet
    /// (a cluster still forming or without a quorum, a leader being
    /// elected). A refusal of the request itself (a subject another stream
    /// owns, more replicas than a lone server has) is not.
    pub fn is_retryable(&self) -> bool {
        let answer = match self {
            Self::Stream { source, .. } => match source.kind() {
                CreateStreamErrorKind::TimedOut
                | CreateStreamErrorKind::JetStreamUnavailable
                | CreateStreamErrorKind::Response => return true,
                CreateStreamErrorKind::JetStream(answer) => answer,
                _ => return false,
            },
            Self::Consumer { source, .. } => match source.kind() {
                ConsumerErrorKind::TimedOut | ConsumerErrorKind::Request => return true,
                ConsumerErrorKind::JetStream(answer) => answer,
                _ => return false,
            },
        };
        answer.code() == 503
            || [
                ErrorCode::CLUSTER_NO_PEERS,
                ErrorCode::CLUSTER_NOT_AVAILABLE,
                ErrorCode::CLUSTER_NOT_LEADER,
            ]
            .contains(&answer.error_code())
    }
}

/// How long [`StreamSpec::provision_patiently`] waits for each answer; a
/// stream is made in tens of milliseconds.
const PROVISION_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// The pause before provisioning again: 200 ms, doubling, at most 5 s.
fn retry_delay(failures: u32) -> Duration {
    Duration::from_millis(200u64 << failures.min(5)).min(Duration::from_secs(5))
}

/// A stream as a service owns it.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamSpec {
    /// The stream's name, e.g. `ORDER`.
    pub name: String,
    /// Its subjects, e.g. `order.>`.
    pub subjects: Vec<String>,
    /// Replicas in a clustered deployment; 1 on a single server.
    pub replicas: usize,
    /// How long JetStream remembers a `Nats-Msg-Id` to drop a re-publish.
    pub duplicate_window: Duration,
    /// How long messages are kept; zero keeps them until limits are hit.
    pub max_age: Duration,
    /// The most bytes the stream holds. A full stream refuses new messages
    /// rather than drop old ones nobody may have consumed yet: the relay
    /// keeps the events in the outbox and retries (its lag alerts), and a
    /// dead letter that cannot be stored is retried, never lost.
    pub max_bytes: i64,
    /// The largest message the stream takes (the server's default
    /// `max_payload`): every event this system writes is far smaller.
    pub max_message_size: i32,
}

/// 1 GiB: a service's own stream, by default.
pub const STREAM_MAX_BYTES: i64 = 1 << 30;
/// 128 MiB each for `DLQ` and `REPLAY`.
pub const SHARED_STREAM_MAX_BYTES: i64 = 128 << 20;

impl StreamSpec {
    /// The stream of a producing service: `name` on `<prefix>.>`, file
    /// storage, one replica, a two-minute duplicate window, kept for 7 days,
    /// at most [`STREAM_MAX_BYTES`], messages of at most 1 MiB.
    pub fn new(name: impl Into<String>, subject_prefix: &str) -> Self {
        Self {
            name: name.into(),
            subjects: vec![format!("{subject_prefix}.>")],
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: STREAM_MAX_BYTES,
            max_message_size: 1 << 20,
        }
    }

    /// The dead-letter stream under the default [`Names`], `DLQ` on `dlq.>`.
    pub fn dead_letters() -> Self {
        Names::default().dead_letter_stream_spec()
    }

    /// The stream of replayed dead letters under the default [`Names`],
    /// `REPLAY` on `replay.>`.
    pub fn replays() -> Self {
        Names::default().replay_stream_spec()
    }

    /// Sets the most bytes the stream holds.
    #[must_use]
    pub fn with_max_bytes(mut self, max_bytes: i64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Sets the replica count.
    #[must_use]
    pub fn with_replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas;
        self
    }

    /// [`provision`](Self::provision), tried again while the failure
    /// [is retryable](ProvisionError::is_retryable) and `patience` lasts:
    /// replicas starting together on a cluster that is still forming, or
    /// during a leader election, wait for it instead of exiting.
    pub async fn provision_patiently(
        &self,
        js: &jetstream::Context,
        patience: Duration,
    ) -> Result<(), ProvisionError> {
        // Two replicas creating the same stream at once: JetStream answers
        // one of them and leaves the other to time out, though the stream
        // is made. A short wait for the answer, then the same (idempotent)
        // request again, which finds it.
        let mut js = js.clone();
        js.set_timeout(PROVISION_REQUEST_TIMEOUT);
        let started = Instant::now();
        let mut failures = 0;
        loop {
            match self.provision(&js).await {
                Err(error) if error.is_retryable() && started.elapsed() < patience => {
                    failures += 1;
                    tracing::warn!(stream = %self.name, %error, failures, "cannot provision the stream yet; retrying");
                    tokio::time::sleep(retry_delay(failures)).await;
                }
                result => return result,
            }
        }
    }

    /// Creates the stream, or updates it to this spec.
    pub async fn provision(&self, js: &jetstream::Context) -> Result<(), ProvisionError> {
        let config = stream::Config {
            name: self.name.clone(),
            subjects: self.subjects.clone(),
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            duplicate_window: self.duplicate_window,
            max_age: self.max_age,
            max_bytes: self.max_bytes,
            max_message_size: self.max_message_size,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        };
        js.create_or_update_stream(config)
            .await
            .map(drop)
            .map_err(|source| ProvisionError::Stream {
                name: self.name.clone(),
                source,
            })
    }
}

/// A durable pull consumer, shared by every replica of the consuming service.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerSpec {
    /// The durable name: the consuming service, e.g. `billing`.
    pub durable_name: String,
    /// The stream to read.
    pub stream: String,
    /// The subjects to receive; empty means all of the stream's.
    pub filter_subjects: Vec<String>,
    /// How long a delivered message may stay unacknowledged before JetStream
    /// delivers it again (the consumer was killed or hung). Ignored when
    /// `ack_backoff` is set: the server then waits its first step.
    pub ack_wait: Duration,
    /// Redelivery delays after successive ack timeouts; empty means
    /// `ack_wait` every time. Handler failures do not wait for these: the
    /// runtime naks them with its own [`crate::consumer::RetryPolicy`].
    pub ack_backoff: Vec<Duration>,
    /// How many messages may be delivered and not yet acknowledged, across
    /// all replicas.
    pub max_ack_pending: i64,
}

impl ConsumerSpec {
    /// A consumer named `durable_name` on `stream`, receiving `filter_subjects`,
    /// with a 30 s ack wait and up to 1,000 messages in flight.
    pub fn new(
        durable_name: impl Into<String>,
        stream: impl Into<String>,
        filter_subjects: &[&str],
    ) -> Self {
        Self {
            durable_name: durable_name.into(),
            stream: stream.into(),
            filter_subjects: filter_subjects.iter().map(|s| (*s).to_owned()).collect(),
            ack_wait: Duration::from_secs(30),
            ack_backoff: Vec::new(),
            max_ack_pending: 1000,
        }
    }

    /// The replay durable of `durable_name` under the default [`Names`]:
    /// on `REPLAY`, filtered on `replay.<durable_name>.>`.
    pub fn replays(durable_name: &str) -> Self {
        Names::default().replay_consumer(durable_name)
    }

    /// Creates the consumer, or updates it to this spec.
    ///
    /// The server's `max_deliver` is left unlimited on purpose: the runtime
    /// counts deliveries itself and dead-letters a message on its last one,
    /// so a message whose last delivery died with its process is still
    /// dead-lettered at the next delivery instead of being stranded.
    pub async fn provision(
        &self,
        js: &jetstream::Context,
    ) -> Result<consumer::PullConsumer, ProvisionError> {
        let config = consumer::pull::Config {
            durable_name: Some(self.durable_name.clone()),
            filter_subjects: self.filter_subjects.clone(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            backoff: self.ack_backoff.clone(),
            max_deliver: -1,
            max_ack_pending: self.max_ack_pending,
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        };
        js.create_consumer_on_stream(config, &self.stream)
            .await
            .map_err(|source| ProvisionError::Consumer {
                name: self.durable_name.clone(),
                stream: self.stream.clone(),
                source,
            })
    }
}

/// The servers of a NATS URL list, `nats://a:4222,nats://b:4222` as
/// `NATS_URL` takes them: a client given every node of a cluster goes to
/// another when its own is lost, even one it has never heard of from the
/// cluster (at start-up, say).
pub fn nats_servers(urls: &str) -> std::io::Result<Vec<async_nats::ServerAddr>> {
    let servers = urls
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(str::parse)
        .collect::<std::io::Result<Vec<async_nats::ServerAddr>>>()?;
    if servers.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "no NATS server URL",
        ));
    }
    Ok(servers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_subject_leads_back_to_the_first_subject() {
        let names = Names::default();
        let replayed = names.replay_subject("billing", "ticket.booked");
        assert_eq!(replayed, "replay.billing.ticket.booked");
        assert_eq!(
            names.original_subject("billing", &replayed),
            "ticket.booked"
        );
        // Only the consumer's own prefix is stripped.
        assert_eq!(names.original_subject("seating", &replayed), replayed);
        assert_eq!(
            names.original_subject("billing", "ticket.booked"),
            "ticket.booked"
        );
        assert_eq!(
            names.original_subject("billing", "replay.billingx.ticket.booked"),
            "replay.billingx.ticket.booked"
        );

        let own = Names {
            replay_prefix: "travel-replay".into(),
            ..Names::default()
        };
        let replayed = own.replay_subject("billing", "ticket.booked");
        assert_eq!(replayed, "travel-replay.billing.ticket.booked");
        assert_eq!(own.original_subject("billing", &replayed), "ticket.booked");
        assert_eq!(
            own.replay_consumer("billing").filter_subjects,
            ["travel-replay.billing.>"]
        );
        assert_eq!(own.replay_stream_spec().subjects, ["travel-replay.>"]);
    }

    #[test]
    fn a_nats_url_list_gives_every_server() {
        let servers =
            super::nats_servers("nats://127.0.0.1:4222, nats://10.0.0.2:4223,tls://n3:4222")
                .unwrap();
        let hosts: Vec<(String, u16)> = servers
            .iter()
            .map(|server| (server.host().to_owned(), server.port()))
            .collect();
        assert_eq!(
            hosts,
            [
                ("127.0.0.1".to_owned(), 4222),
                ("10.0.0.2".to_owned(), 4223),
                ("n3".to_owned(), 4222)
            ]
        );
        assert!(super::nats_servers("").is_err());
        assert!(super::nats_servers(" , ").is_err());
        assert!(super::nats_servers("nats://a:4222,http://b").is_err());
    }
}
