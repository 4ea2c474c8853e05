//! One way in: a service's messaging, set up by one builder from a NATS
//! context, a pool and one [`Config`] (see the crate's guide).

use std::time::Duration;

use async_nats::jetstream;
use futures::future::join_all;
use tokio_util::sync::CancellationToken;

use crate::BoxFuture;
use crate::consumer::{EventConsumer, RetryPolicy, Router};
use crate::db::PgPool;
use crate::metrics::MessagingMetrics;
use crate::outbox::{Outbox, Relay, RelayConfig};
use crate::provision::{ConsumerSpec, Names, ProvisionError, STREAM_MAX_BYTES, StreamSpec};

/// Everything a service's messaging is configured by, with the defaults
/// [`Config::new`] gives. Start from those and change what you need:
///
/// ```
/// let mut config = pg_jetstream::Config::new("billing");
/// config.batch_size = 32;
/// config.stream_replicas = 3;
/// assert_eq!(config.stream, "BILLING");
/// assert_eq!(config.source, "billing");
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// The service: the name of its durable consumers (shared by its
    /// replicas) and the first token of the subjects its events go out on
    /// (`billing.>`).
    pub service: String,
    /// The stream of the events it publishes, on `<service>.>`; default:
    /// the service's name in capitals.
    pub stream: String,
    /// The CloudEvents `ce-source` of its events; default: the service's
    /// name. Its last `/`-separated segment names the service in traces.
    pub source: String,
    /// Where dead letters go and replays come from; the same for every
    /// service of the system. Default: [`Names::default`].
    pub names: Names,
    /// Retries of a failed handler, and when a message is dead-lettered.
    /// Default: [`RetryPolicy::default`] (0.5 s doubling to 30 s, 8
    /// attempts).
    pub retry: RetryPolicy,
    /// The most messages handled in one transaction. Default: 64.
    pub batch_size: usize,
    /// Batches handled at once by each consumer. Default: 1, which lets
    /// batches grow with the load (see [`EventConsumer::with_concurrency`]).
    pub concurrency: usize,
    /// How long inbox rows are kept: longer than the streams keep messages.
    /// Default: 14 days.
    pub inbox_retention: Duration,
    /// How long a delivered message may stay unacknowledged before
    /// JetStream delivers it again. Default: 30 s.
    pub ack_wait: Duration,
    /// How the relay sweeps the outbox. Default: [`RelayConfig::default`].
    pub relay: RelayConfig,
    /// Replicas of the streams it provisions. Default: 1.
    pub stream_replicas: usize,
    /// The most bytes its own stream holds. Default: 1 GiB.
    pub stream_max_bytes: i64,
    /// Whether it provisions the dead-letter and replay streams too (or
    /// leaves them to an operator, and only warns when they are missing).
    /// Default: true.
    pub provision_shared_streams: bool,
    /// How long start-up keeps trying to provision while JetStream cannot
    /// serve it yet (a cluster forming, a leader election). Default: 90 s.
    pub provision_patience: Duration,
}

impl Config {
    /// The defaults for the service named `service`.
    pub fn new(service: impl Into<String>) -> Self {
        let service = service.into();
        Self {
            stream: service.to_uppercase(),
            source: service.clone(),
            service,
            names: Names::default(),
            retry: RetryPolicy::default(),
            batch_size: 64,
            concurrency: 1,
            inbox_retention: Duration::from_secs(14 * 24 * 3600),
            ack_wait: Duration::from_secs(30),
            relay: RelayConfig::default(),
            stream_replicas: 1,
            stream_max_bytes: STREAM_MAX_BYTES,
            provision_shared_streams: true,
            provision_patience: Duration::from_secs(90),
        }
    }
}

/// Why a service's messaging could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The database lacks the runtime's tables, or some of them.
    #[error(
        "the database lacks {} of the runtime's migrations ({}): apply pg_jetstream::MIGRATIONS first",
        .0.len(), .0.join(", ")
    )]
    Migrations(Vec<String>),
    /// The database could not be used: unreachable, or its sessions would
    /// not speak English (see [`crate::db::english_messages`]).
    #[error("the database: {0}")]
    Database(String),
    /// A stream could not be provisioned.
    #[error(transparent)]
    Provision(#[from] ProvisionError),
}

/// A long-running part of a service's messaging: a consumer or the relay.
pub struct Task {
    name: String,
    consumer: Option<(String, String)>,
    run: Box<dyn FnOnce(CancellationToken) -> BoxFuture<'static, ()> + Send>,
}

impl std::fmt::Debug for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Task")
            .field("name", &self.name)
            .field("consumer", &self.consumer)
            .finish()
    }
}

impl Task {
    fn new<F>(name: String, run: impl FnOnce(CancellationToken) -> F + Send + 'static) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        Self {
            name,
            consumer: None,
            run: Box::new(move |shutdown| Box::pin(run(shutdown))),
        }
    }

    fn consuming(mut self, spec: &ConsumerSpec) -> Self {
        self.consumer = Some((spec.durable_name.clone(), spec.stream.clone()));
        self
    }

    /// What it is: `relay`, `consumer of ORDER`, `replays`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// For a consumer, its durable's name and stream, to watch it by
    /// (JetStream's consumer info); `None` for the relay.
    pub fn consumer(&self) -> Option<(&str, &str)> {
        self.consumer
            .as_ref()
            .map(|(durable, stream)| (durable.as_str(), stream.as_str()))
    }

    /// Runs until `shutdown` is cancelled and its work in hand is done.
    pub async fn run(self, shutdown: CancellationToken) {
        (self.run)(shutdown).await;
    }
}

/// Sets up a service's messaging; made by [`Messaging::builder`].
pub struct MessagingBuilder<S> {
    js: jetstream::Context,
    pool: PgPool,
    relay_pool: Option<PgPool>,
    config: Config,
    metrics: MessagingMetrics,
    outbox: Outbox,
    routes: Vec<(String, Router<S>)>,
}

impl<S> std::fmt::Debug for MessagingBuilder<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessagingBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A service's messaging, started: its [`Outbox`] for the writes of its
/// API, the relay that backs the outbox up, and a consumer per stream it
/// reads (and one of the dead letters replayed to it).
#[derive(Debug)]
pub struct Messaging {
    outbox: Outbox,
    metrics: MessagingMetrics,
    relay: Task,
    consumers: Vec<Task>,
}

impl Messaging {
    /// A builder of the messaging of `config.service`, over `js` and the
    /// service's database `pool` (which must have
    /// [`MIGRATIONS`](crate::MIGRATIONS) applied).
    pub fn builder<S>(js: jetstream::Context, pool: PgPool, config: Config) -> MessagingBuilder<S> {
        let metrics = MessagingMetrics::default();
        let outbox = Outbox::new(config.source.clone())
            .publishing_to(js.clone())
            .with_metrics(metrics.clone());
        MessagingBuilder {
            js,
            pool,
            relay_pool: None,
            config,
            metrics,
            outbox,
            routes: Vec::new(),
        }
    }

    /// The outbox: write events with [`Outbox::append`] in your own
    /// transactions, then [`Outbox::publish`] them once committed.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// The metrics every part counts into (register them with
    /// [`MessagingMetrics::register`]).
    pub fn metrics(&self) -> &MessagingMetrics {
        &self.metrics
    }

    /// The relay and the consumers, for a program that orders its own
    /// shutdown: stop the relay last, after the consumers and whatever
    /// else writes to the outbox have finished, so that it publishes what
    /// they committed.
    pub fn into_tasks(self) -> (Task, Vec<Task>) {
        (self.relay, self.consumers)
    }

    /// Runs every consumer and the relay until `shutdown` is cancelled;
    /// then lets the consumers finish their batches, and only then stops
    /// the relay, which publishes what they committed.
    pub async fn run(self, shutdown: CancellationToken) {
        let relay_stop = CancellationToken::new();
        let relay = tokio::spawn(self.relay.run(relay_stop.clone()));
        join_all(
            self.consumers
                .into_iter()
                .map(|consumer| tokio::spawn(consumer.run(shutdown.clone()))),
        )
        .await;
        relay_stop.cancel();
        let _ = relay.await;
    }
}

impl<S: Clone + Send + Sync + 'static> MessagingBuilder<S> {
    /// Consumes `stream` (another service's) through `router`: a durable
    /// named after the service, receiving the router's subjects.
    #[must_use]
    pub fn consume(mut self, stream: impl Into<String>, router: Router<S>) -> Self {
        self.routes.push((stream.into(), router));
        self
    }

    /// Gives the relay a pool of its own, so that busy consumers never
    /// starve its sweep (default: the service's pool).
    #[must_use]
    pub fn relay_pool(mut self, pool: PgPool) -> Self {
        self.relay_pool = Some(pool);
        self
    }

    /// The metrics every part will count into, to register before the
    /// start ([`MessagingMetrics::register`]).
    pub fn metrics(&self) -> &MessagingMetrics {
        &self.metrics
    }

    /// The outbox the service's own writes go through, for what must be
    /// built before the start (a handler state that writes outside its
    /// handlers, an API): the same one the relay backs up.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Checks that the database has the runtime's tables and sessions it
    /// can classify failures on, provisions the service's stream (and the
    /// shared ones, unless configured not to), and returns the messaging,
    /// with `state` the handlers' state for every route.
    pub async fn start(self, state: S) -> Result<Messaging, StartError> {
        let Self {
            js,
            pool,
            relay_pool,
            config,
            metrics,
            outbox,
            routes,
        } = self;
        {
            // A session of the pool is made to speak English as it opens,
            // or refused (see `db::pool`).
            let mut conn = pool
                .get()
                .await
                .map_err(|error| StartError::Database(error.to_string()))?;
            let pending = crate::db::pending_on(&mut conn, vec![crate::MIGRATIONS])
                .await
                .map_err(|error| StartError::Database(error.to_string()))?;
            if !pending.is_empty() {
                return Err(StartError::Migrations(pending));
            }
        }
        StreamSpec::new(config.stream.clone(), &config.service)
            .with_replicas(config.stream_replicas)
            .with_max_bytes(config.stream_max_bytes)
            .provision_patiently(&js, config.provision_patience)
            .await?;
        for shared in [
            config.names.dead_letter_stream_spec(),
            config.names.replay_stream_spec(),
        ] {
            if config.provision_shared_streams {
                shared
                    .with_replicas(config.stream_replicas)
                    .provision_patiently(&js, config.provision_patience)
                    .await?;
            } else if let Err(error) = js.get_stream(&shared.name).await {
                // A dead letter waits (and is retried) until the stream
                // exists, and the replay consumer keeps trying.
                tracing::warn!(stream = %shared.name, %error, "a shared stream is missing");
            }
        }
        let relay = Relay::new(
            relay_pool.unwrap_or_else(|| pool.clone()),
            js.clone(),
            config.relay.clone(),
        )
        .forgetting_for(&outbox)
        .with_metrics(metrics.clone());
        let relay = Task::new("relay".to_owned(), move |shutdown| relay.run(shutdown));

        let consumer = |spec: ConsumerSpec, router: Router<S>| {
            EventConsumer::new(
                js.clone(),
                pool.clone(),
                outbox.clone(),
                ConsumerSpec {
                    ack_wait: config.ack_wait,
                    ..spec
                },
                router,
                state.clone(),
            )
            .with_retry(config.retry.clone())
            .with_batch_size(config.batch_size)
            .with_concurrency(config.concurrency)
            .with_inbox_retention(config.inbox_retention)
            .with_names(config.names.clone())
            .with_metrics(metrics.clone())
        };
        let mut consumers = Vec::new();
        let mut replayed: Option<Router<S>> = None;
        for (stream, router) in routes {
            replayed = Some(match replayed {
                Some(all) => all.merge(router.clone()),
                None => router.clone(),
            });
            let spec = ConsumerSpec::new(&config.service, &stream, &[]);
            let running = consumer(spec.clone(), router);
            consumers.push(
                Task::new(format!("consumer of {stream}"), move |shutdown| {
                    running.run(shutdown)
                })
                .consuming(&spec),
            );
        }
        // Dead letters an operator replays come back to this service only.
        if let Some(router) = replayed {
            let spec = config.names.replay_consumer(&config.service);
            let running = consumer(spec.clone(), router);
            consumers.push(
                Task::new("replays".to_owned(), move |shutdown| running.run(shutdown))
                    .consuming(&spec),
            );
        }
        Ok(Messaging {
            outbox,
            metrics,
            relay,
            consumers,
        })
    }
}
