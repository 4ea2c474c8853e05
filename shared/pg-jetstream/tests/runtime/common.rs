//! What the messaging tests share: real servers, a migrated database, and a
//! handler that records its effects in a table without a unique key, so that
//! a double effect shows as two rows.

#![allow(unreachable_pub, missing_debug_implementations)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::events::{OrderConfirmed, OrderPlaced};
use async_nats::HeaderMap;
use async_nats::jetstream;
use diesel::sql_types::{BigInt, Text, Uuid as SqlUuid};
use diesel_async::{
    AsyncConnection as _, AsyncPgConnection, RunQueryDsl as _, SimpleAsyncConnection as _,
};
use futures::StreamExt as _;
use pg_jetstream::db::PgPool;
use pg_jetstream::{
    Context, Handler, HandlerError, Outbox, Route, Router,
    consumer::{Batch, BatchHandler, EventConsumer, RetryPolicy},
    envelope::OutgoingEvent,
    outbox::{Relay, RelayConfig},
    provision::{ConsumerSpec, StreamSpec},
};
use shop_test_support::TestInfra;

pub struct Setup {
    pub infra: TestInfra,
    pub url: String,
    pub pool: PgPool,
    pub js: jetstream::Context,
    pub outbox: Outbox,
}

pub async fn setup() -> Setup {
    setup_with(&[]).await
}

/// [`setup`], with `settings` for PostgreSQL on top of the harness's.
pub async fn setup_with(settings: &[String]) -> Setup {
    // Logs only when asked for: TEST_LOG=debug cargo nextest run ...
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
    let infra = TestInfra::start_with_postgres_settings(settings).await;
    let url = infra.postgres.create_database("svc").await;
    pg_jetstream::db::migrate(&url, vec![pg_jetstream::MIGRATIONS])
        .await
        .unwrap();
    let mut conn = AsyncPgConnection::establish(&url).await.unwrap();
    conn.batch_execute(
        "CREATE TABLE effects (event_id UUID NOT NULL, order_id TEXT NOT NULL); \
         CREATE TABLE stock (sku TEXT PRIMARY KEY, available BIGINT NOT NULL); \
         INSERT INTO stock VALUES ('LAMP', 1000)",
    )
    .await
    .unwrap();
    let pool = pg_jetstream::db::pool(&url, 16).unwrap();
    let js = jetstream::new(infra.nats.client().await);
    StreamSpec::new("ORDER", "order")
        .provision(&js)
        .await
        .unwrap();
    StreamSpec::dead_letters().provision(&js).await.unwrap();
    StreamSpec::replays().provision(&js).await.unwrap();
    Setup {
        infra,
        url,
        pool,
        js,
        outbox: Outbox::new("example/test"),
    }
}

/// How the test handler behaves, keyed by order id.
#[derive(Debug, Default)]
pub struct Behaviour {
    /// Transient failures left before success.
    pub transient_failures: Mutex<HashMap<String, u32>>,
    /// Panics left before success.
    pub panics: Mutex<HashMap<String, u32>>,
    /// Order ids that always fail permanently.
    pub permanent: Mutex<Vec<String>>,
    /// When each order's deliveries reached the handler.
    pub deliveries: Mutex<HashMap<String, Vec<Instant>>>,
    /// How long each handling takes.
    pub work: Mutex<Duration>,
    /// How many events each call of the batch handler got.
    pub batch_sizes: Mutex<Vec<usize>>,
    /// Order ids at which the batch handler waits for a permit.
    pub gates: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
    /// Times another writer takes a unit of stock between the one-statement
    /// handler's read and its write.
    pub interlopers: Mutex<u32>,
    /// Per confirmation handled, its order and the effects that order had
    /// then.
    pub seen_by_confirmations: Mutex<Vec<(String, i64)>>,
}

impl Behaviour {
    /// Makes the batch handler wait at `order_id` until the returned gate
    /// is given a permit.
    pub fn gate(&self, order_id: &str) -> Arc<tokio::sync::Semaphore> {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        self.gates
            .lock()
            .unwrap()
            .insert(order_id.to_owned(), Arc::clone(&gate));
        gate
    }

    /// Waits at the events' gates, if any.
    pub async fn pass_gates(&self, events: &[OrderPlaced]) {
        for event in events {
            let gate = self.gates.lock().unwrap().get(&event.order_id).cloned();
            if let Some(gate) = gate {
                gate.acquire().await.unwrap().forget();
            }
        }
    }

    /// A permanent failure if any of `events` is in `permanent`.
    pub fn refuse(&self, events: &[OrderPlaced]) -> Result<(), HandlerError> {
        let permanent = self.permanent.lock().unwrap().clone();
        match events
            .iter()
            .find(|event| permanent.contains(&event.order_id))
        {
            Some(bad) => Err(HandlerError::permanent(format!(
                "order {} is not acceptable",
                bad.order_id
            ))),
            None => Ok(()),
        }
    }

    fn take(map: &Mutex<HashMap<String, u32>>, order_id: &str) -> bool {
        let mut map = map.lock().unwrap();
        match map.get_mut(order_id) {
            Some(left) if *left > 0 => {
                *left -= 1;
                true
            }
            _ => false,
        }
    }
}

/// Records each event's effect, failing, panicking or waiting as the
/// behaviour says.
impl Handler<OrderPlaced> for Behaviour {
    async fn handle(&self, cx: &mut Context<'_>, event: OrderPlaced) -> Result<(), HandlerError> {
        let behaviour = self;
        behaviour
            .deliveries
            .lock()
            .unwrap()
            .entry(event.order_id.clone())
            .or_default()
            .push(Instant::now());
        let work = *behaviour.work.lock().unwrap();
        if !work.is_zero() {
            tokio::time::sleep(work).await;
        }
        if Behaviour::take(&behaviour.transient_failures, &event.order_id) {
            return Err(HandlerError::retryable("the test dependency is down"));
        }
        if Behaviour::take(&behaviour.panics, &event.order_id) {
            panic!("the handler panics for {}", event.order_id);
        }
        if behaviour
            .permanent
            .lock()
            .unwrap()
            .contains(&event.order_id)
        {
            return Err(HandlerError::permanent(format!(
                "order {} is not acceptable",
                event.order_id
            )));
        }
        diesel::sql_query("INSERT INTO effects (event_id, order_id) VALUES ($1, $2)")
            .bind::<SqlUuid, _>(cx.envelope().id)
            .bind::<Text, _>(&event.order_id)
            .execute(cx.conn())
            .await?;
        Ok(())
    }
}

/// The batch form of the [`Handler`]: records every event's effect, and
/// emits an `order.confirmed` for each; fails the whole call when any of
/// its events is in `permanent`.
impl BatchHandler<OrderPlaced> for Behaviour {
    async fn handle_batch(
        &self,
        batch: &mut Batch<'_>,
        events: Vec<OrderPlaced>,
    ) -> Result<(), HandlerError> {
        self.batch_sizes.lock().unwrap().push(events.len());
        self.pass_gates(&events).await;
        self.refuse(&events)?;
        for (index, event) in events.iter().enumerate() {
            diesel::sql_query("INSERT INTO effects (event_id, order_id) VALUES ($1, $2)")
                .bind::<SqlUuid, _>(batch.envelope(index).id)
                .bind::<Text, _>(&event.order_id)
                .execute(batch.conn())
                .await?;
            batch.emit(
                index,
                &OrderConfirmed {
                    order_id: event.order_id.clone(),
                    ..Default::default()
                },
            );
        }
        Ok(())
    }
}

/// A relay that sweeps every row, however young, every 200 ms: the tests'
/// outbox has no publisher, so the sweep is how its events go out.
pub fn relay(setup: &Setup) -> Relay {
    Relay::new(
        setup.pool.clone(),
        setup.js.clone(),
        RelayConfig {
            sweep_after: Duration::ZERO,
            interval: Duration::from_millis(200),
            ..RelayConfig::default()
        },
    )
}

/// The test handler as the `inventory` consumer of `ORDER`.
pub fn consumer(setup: &Setup, behaviour: Arc<Behaviour>) -> EventConsumer<Arc<Behaviour>> {
    consumer_on(
        setup,
        ConsumerSpec::new("inventory", "ORDER", &[]),
        behaviour,
    )
}

/// The test handler behind the durable consumer `spec`.
pub fn consumer_on(
    setup: &Setup,
    spec: ConsumerSpec,
    behaviour: Arc<Behaviour>,
) -> EventConsumer<Arc<Behaviour>> {
    consumer_with(
        setup,
        spec,
        Router::new().on::<OrderPlaced>(Route::single()),
        behaviour,
    )
}

/// `router` behind the durable consumer `spec`, with the tests' short ack
/// wait and retry delays.
pub fn consumer_with(
    setup: &Setup,
    spec: ConsumerSpec,
    router: Router<Arc<Behaviour>>,
    behaviour: Arc<Behaviour>,
) -> EventConsumer<Arc<Behaviour>> {
    EventConsumer::new(
        setup.js.clone(),
        setup.pool.clone(),
        setup.outbox.clone(),
        // A short ack wait, so that messages left in flight by a stopped
        // consumer come back quickly.
        ConsumerSpec {
            ack_wait: Duration::from_secs(2),
            ..spec
        },
        router,
        behaviour,
    )
    .with_retry(RetryPolicy {
        initial: Duration::from_millis(100),
        multiplier: 2,
        max: Duration::from_secs(2),
        max_deliver: 4,
        max_deliveries: 16,
    })
}

/// Waits until JetStream has handed the `inventory` consumer of `ORDER`
/// every message and `in_hand` of them are unacknowledged. The consumers
/// share `setup.js`'s connection, so the messages reached the client before
/// the answer did.
pub async fn in_consumers_hands(setup: &Setup, in_hand: u64) {
    let stream = setup.js.get_stream("ORDER").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = stream.consumer_info("inventory").await.unwrap();
        if info.num_pending == 0 && info.num_ack_pending as u64 == in_hand {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{in_hand} messages never reached the consumer: {} pending, {} in hand",
            info.num_pending,
            info.num_ack_pending
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Makes the events that `write` appends to the outbox reach a batch
/// consumer of `order.placed` together: its first batch, the single event
/// `gate`, holds until they have all been delivered behind it, so that they
/// are its next batch. `start_consumer` starts it once `gate` is in the
/// stream; returns what it returned and the ids `write` returned.
pub async fn delivered_together<T>(
    setup: &Setup,
    behaviour: &Behaviour,
    gate: &str,
    start_consumer: impl FnOnce() -> T,
    write: impl AsyncFnOnce() -> Vec<uuid::Uuid>,
) -> (T, Vec<uuid::Uuid>) {
    let opens = behaviour.gate(gate);
    let sizes_before = behaviour.batch_sizes.lock().unwrap().len();
    append(setup, &[placed(gate)]).await;
    relay(setup).sweep_once().await.unwrap();
    let started = start_consumer();
    let deadline = Instant::now() + Duration::from_secs(20);
    while behaviour.batch_sizes.lock().unwrap().len() == sizes_before {
        assert!(Instant::now() < deadline, "the gate's batch never came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ids = write().await;
    relay(setup).sweep_once().await.unwrap();
    in_consumers_hands(setup, 1 + ids.len() as u64).await;
    opens.add_permits(1);
    (started, ids)
}

pub fn placed(order_id: &str) -> OutgoingEvent {
    OutgoingEvent::new(&OrderPlaced {
        order_id: order_id.into(),
        user_id: "u".into(),
    })
    .correlated(order_id)
}

/// Writes events to the outbox in one committed transaction.
pub async fn append(setup: &Setup, events: &[OutgoingEvent]) -> Vec<uuid::Uuid> {
    let mut conn = AsyncPgConnection::establish(&setup.url).await.unwrap();
    let outbox = setup.outbox.clone();
    let events = events.to_vec();
    conn.transaction::<_, diesel::result::Error, _>(async move |conn| {
        outbox.append(conn, events).await
    })
    .await
    .unwrap()
    .ids()
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

pub async fn count(url: &str, sql: &str) -> i64 {
    let mut conn = AsyncPgConnection::establish(url).await.unwrap();
    diesel::sql_query(sql)
        .get_result::<Count>(&mut conn)
        .await
        .unwrap()
        .n
}

/// An `order.confirmed` row of the outbox, as the batch handler wrote it.
#[derive(Debug, diesel::QueryableByName)]
pub struct Confirmation {
    #[diesel(sql_type = SqlUuid)]
    pub causation_id: uuid::Uuid,
    #[diesel(sql_type = Text)]
    pub correlation_id: String,
    #[diesel(sql_type = Text)]
    pub traceparent: String,
}

/// The `order.confirmed` rows of the outbox, in the order they were written.
pub async fn confirmations(setup: &Setup) -> Vec<Confirmation> {
    let mut conn = AsyncPgConnection::establish(&setup.url).await.unwrap();
    diesel::sql_query(
        "SELECT causation_id, correlation_id, coalesce(traceparent, '') AS traceparent \
         FROM outbox WHERE subject = 'order.confirmed' ORDER BY seq",
    )
    .load(&mut conn)
    .await
    .unwrap()
}

pub async fn effects(setup: &Setup, order_id: &str) -> i64 {
    count(
        &setup.url,
        &format!("SELECT count(*) AS n FROM effects WHERE order_id = '{order_id}'"),
    )
    .await
}

pub async fn stream_messages(js: &jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

/// Publishes stored message `sequence` of ORDER again under another
/// JetStream message id, so that the broker's de-duplication does not hide
/// the copy; optionally with another body. Returns the original.
pub async fn republish(
    setup: &Setup,
    sequence: u64,
    msg_id: &str,
    body: Option<Vec<u8>>,
) -> async_nats::jetstream::message::StreamMessage {
    let original = setup
        .js
        .get_stream("ORDER")
        .await
        .unwrap()
        .get_raw_message(sequence)
        .await
        .unwrap();
    let mut headers = original.headers.clone();
    headers.insert(pg_jetstream::envelope::headers::NATS_MSG_ID, msg_id);
    let payload = body.map_or_else(|| original.payload.clone(), Into::into);
    setup
        .js
        .publish_with_headers(original.subject.to_string(), headers, payload)
        .await
        .unwrap()
        .await
        .unwrap();
    original
}

/// Polls `check` until it holds or `timeout` passes; panics with `what`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub const WAIT: Duration = Duration::from_secs(20);

/// Outbox rows not yet published (the tests' outbox has no publisher).
pub async fn pending(setup: &Setup) -> i64 {
    count(&setup.url, "SELECT count(*) AS n FROM outbox").await
}

pub async fn dead_letters(setup: &Setup, expected: usize) -> Vec<async_nats::jetstream::Message> {
    let stream = setup.js.get_stream("DLQ").await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config::default())
        .await
        .unwrap();
    let mut batch = consumer
        .fetch()
        .max_messages(expected + 1)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .unwrap();
    let mut letters = Vec::new();
    while let Some(message) = batch.next().await {
        letters.push(message.unwrap());
    }
    letters
}

pub fn header<'a>(headers: &'a Option<HeaderMap>, name: &str) -> &'a str {
    headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str())
        .unwrap_or_default()
}

/// The `(causation id, correlation id)` of the `order.confirmed` rows.
pub async fn causes(setup: &Setup) -> Vec<(uuid::Uuid, String)> {
    confirmations(setup)
        .await
        .into_iter()
        .map(|row| (row.causation_id, row.correlation_id))
        .collect()
}
