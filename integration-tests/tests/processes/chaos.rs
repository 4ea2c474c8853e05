//! Faults at random while sagas flow, then the design's invariants, on two
//! shapes of the system.
//!
//! The four services run as OS processes from their real binaries against
//! a real PostgreSQL and JetStream. On one `nats-server` (R1 streams), two
//! replicas of inventory and of payment share their durable consumers. On
//! the production shape, a three-node JetStream cluster with R3 streams,
//! every service runs two replicas (both order relays and both deadline
//! sweepers at work). While a driver places orders (most confirm; some run
//! out of stock, some fail payment, and the outages make some time out), a
//! seeded schedule SIGKILLs and restarts service processes, kills and
//! restarts PostgreSQL on its data, SIGSTOPs a replica for longer than the
//! ack wait and SIGCONTs it, and SIGTERMs a replica under load; on one
//! server it kills and restarts nats-server on its store, on the cluster it
//! SIGKILLs one node and starts it again, SIGSTOPs one past its peers'
//! election timeouts, and restarts all three in turn. Once everything is
//! quiet, the checker reads the four databases and the streams.
//!
//! Payments go through the payment provider simulator (a process of its
//! own) with its faults: declines, 503s, answers lost after the charge or
//! the refund was made, webhooks late, duplicated, out of order and badly
//! signed; the checker also reads the simulator's ledger. One more run on
//! one server takes payments from the wallets.
//!
//! Size and seed come from the environment: `CHAOS_SAGAS` (300),
//! `CHAOS_RATE` (sagas placed per second, 10), `CHAOS_FAULTS` (10),
//! `CHAOS_SEED` (a fixed one); the same seed replays the same schedule.

#![allow(clippy::print_stdout)]

use shop_integration_tests::processes;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use diesel::sql_types::{BigInt, Text};
use diesel_async::{AsyncConnection as _, AsyncPgConnection};
use processes::{ProviderProcess, ServiceProcess, all_current, check_streams};
use shop_proto::inventory::v1::CreateProductRequest;
use shop_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use shop_proto::order::v1::order_service_client::OrderServiceClient;
use shop_proto::order::v1::{OrderItem, PlaceOrderRequest};
use shop_proto::user::v1::CreateUserRequest;
use shop_proto::user::v1::user_service_client::UserServiceClient;
use shop_test_support::{TestNats, TestNatsCluster, TestPostgres};
use tokio::sync::Mutex;

const STARTING_CREDIT: i64 = 1_000_000_000;
/// How long the payment service waits for the provider before the outcome
/// is unknown; the simulator holds a lost answer for longer.
const PROVIDER_TIMEOUT_MS: u64 = 500;
const DEADLINE_MS: u64 = 8_000;
const ACK_WAIT_MS: u64 = 5_000;
const USERS: usize = 50;
/// Products: a cheap one with plenty of stock, one never in stock, one no
/// wallet can pay.
const PRODUCTS: [(&str, i64, i64); 3] = [
    ("LAMP", 100, 1_000_000),
    ("GONE", 100, 0),
    ("YACHT", STARTING_CREDIT * 10, 1_000_000),
];

/// Each stream and the durable consumers that read it.
const DURABLES: [(&str, &[&str]); 4] = [
    ("USER", &["order", "payment"]),
    ("ORDER", &["inventory", "payment"]),
    ("INVENTORY", &["order", "payment"]),
    ("PAYMENT", &["order", "inventory"]),
];

/// splitmix64: a small, seedable generator, enough for a schedule.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// SIGKILL a process, then start it again.
    Kill(&'static str, usize),
    /// SIGKILL nats-server, then start it on the same store.
    RestartNats,
    /// Stop PostgreSQL at once (immediate shutdown: no checkpoint, recovery
    /// from the WAL on start, as after a crash), then start it on the same
    /// data.
    RestartPostgres,
    /// SIGSTOP a replica for longer than the ack wait, then SIGCONT it.
    Pause(&'static str, usize),
    /// SIGTERM a replica under load, then start it again.
    Terminate(&'static str, usize),
    /// SIGKILL one node of the cluster, then start it on its store.
    KillNatsNode(usize),
    /// SIGSTOP one node of the cluster past its peers' election timeouts,
    /// then SIGCONT it: it must rejoin and catch up.
    PauseNatsNode(usize),
    /// SIGTERM each node of the cluster in turn and start it again, each
    /// back and current before the next goes.
    RollingNatsRestart,
}

impl Fault {
    fn kind(self) -> &'static str {
        match self {
            Self::Kill(..) => "SIGKILL a service",
            Self::RestartNats => "restart nats-server",
            Self::RestartPostgres => "restart PostgreSQL",
            Self::Pause(..) => "SIGSTOP a replica",
            Self::Terminate(..) => "SIGTERM a replica",
            Self::KillNatsNode(..) => "SIGKILL a NATS node",
            Self::PauseNatsNode(..) => "SIGSTOP a NATS node",
            Self::RollingNatsRestart => "rolling restart of NATS",
        }
    }
}

/// The system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// One nats-server, R1 streams; two replicas of inventory and payment.
    Single,
    /// A three-node JetStream cluster, R3 streams; two replicas of every
    /// service.
    Cluster,
}

const CLUSTER_NODES: usize = 3;

impl Shape {
    /// Which processes of which service run.
    fn processes(self) -> &'static [(&'static str, usize)] {
        match self {
            Self::Single => &[
                ("user", 0),
                ("order", 0),
                ("inventory", 0),
                ("inventory", 1),
                ("payment", 0),
                ("payment", 1),
            ],
            Self::Cluster => &[
                ("user", 0),
                ("user", 1),
                ("order", 0),
                ("order", 1),
                ("inventory", 0),
                ("inventory", 1),
                ("payment", 0),
                ("payment", 1),
            ],
        }
    }

    /// The services with two replicas, whose replicas can be paused or
    /// terminated while the other carries on.
    fn replicated(self) -> &'static [&'static str] {
        match self {
            Self::Single => &["inventory", "payment"],
            Self::Cluster => &["user", "order", "inventory", "payment"],
        }
    }

    fn stream_replicas(self) -> usize {
        match self {
            Self::Single => 1,
            Self::Cluster => CLUSTER_NODES,
        }
    }
}

/// The schedule of a seed: (pause before, fault, how long it lasts), each
/// fault over before the next begins.
fn schedule(seed: u64, faults: usize, shape: Shape) -> Vec<(Duration, Fault, Duration)> {
    let mut rng = Rng(seed);
    let processes = shape.processes();
    let replicated = shape.replicated();
    (0..faults)
        .map(|i| {
            let (name, replica) = processes[rng.below(processes.len() as u64) as usize];
            let of_replicated = replicated[rng.below(replicated.len() as u64) as usize];
            let replica_of = rng.below(2) as usize;
            // Every kind comes round in turn; the targets are random. (One
            // server's schedule draws what it drew before the cluster's
            // faults existed, so that its seeds replay as they did.)
            let fault = match shape {
                Shape::Single => match i % 5 {
                    0 => Fault::Kill(name, replica),
                    1 => Fault::RestartNats,
                    2 => Fault::Pause(of_replicated, replica_of),
                    3 => Fault::RestartPostgres,
                    _ => Fault::Terminate(of_replicated, replica_of),
                },
                Shape::Cluster => {
                    let node = rng.below(CLUSTER_NODES as u64) as usize;
                    match i % 7 {
                        0 => Fault::Kill(name, replica),
                        1 => Fault::KillNatsNode(node),
                        2 => Fault::Pause(of_replicated, replica_of),
                        3 => Fault::RestartPostgres,
                        4 => Fault::Terminate(of_replicated, replica_of),
                        5 => Fault::PauseNatsNode(node),
                        _ => Fault::RollingNatsRestart,
                    }
                }
            };
            // Time for the sagas placed since the last fault to finish.
            let before = Duration::from_millis(1500 + rng.below(1500));
            let lasting = match fault {
                // Sagas placed meanwhile wait in the outbox; with the
                // reconnections after it, some of them time out.
                Fault::RestartNats | Fault::KillNatsNode(..) => {
                    Duration::from_millis(1000 + rng.below(2000))
                }
                // Longer than the ack wait: its messages go to the other replica.
                Fault::Pause(..) => Duration::from_millis(ACK_WAIT_MS + 500 + rng.below(1500)),
                // Past the election timeouts of the node's raft groups
                // (at most 9 s in nats-server): its streams elect a leader
                // elsewhere, and it comes back behind.
                Fault::PauseNatsNode(..) => Duration::from_millis(10_000 + rng.below(3000)),
                // How long each node of the cluster is down.
                Fault::RollingNatsRestart => Duration::from_millis(500 + rng.below(1000)),
                _ => Duration::from_millis(200 + rng.below(1000)),
            };
            (before, fault, lasting)
        })
        .collect()
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// The JetStream the services talk to.
enum Broker {
    Single(Box<TestNats>),
    Cluster(TestNatsCluster),
}

/// How a run takes payments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Payments {
    Wallet,
    Provider,
}

/// The faults of the provider simulator in these runs.
fn provider_faults() -> String {
    serde_json::json!({
        "latency_ms": 5,
        "decline_rate": 0.02,
        "decline_above_cents": STARTING_CREDIT,
        "error_rate": 0.05,
        "timeout_after_charge_rate": 0.05,
        "refund_timeout_rate": 0.1,
        "hang_ms": 2_000,
        "webhook_delay_ms": 800,
        "webhook_duplicate_rate": 0.2,
        "webhook_bad_signature_rate": 0.05,
        "webhook_old_timestamp_rate": 0.05,
    })
    .to_string()
}

struct System {
    shape: Shape,
    broker: Broker,
    postgres: TestPostgres,
    processes: HashMap<(&'static str, usize), ServiceProcess>,
    provider: Option<ProviderProcess>,
}

impl System {
    async fn start(shape: Shape, payments: Payments, seed: u64) -> Self {
        let broker = async {
            match shape {
                Shape::Single => Broker::Single(Box::new(TestNats::start().await)),
                Shape::Cluster => Broker::Cluster(TestNatsCluster::start(CLUSTER_NODES).await),
            }
        };
        let (broker, postgres) = tokio::join!(broker, TestPostgres::start());
        let nats_url = match &broker {
            Broker::Single(nats) => nats.url(),
            Broker::Cluster(cluster) => cluster.urls(),
        };
        for service in ["user", "order", "inventory", "payment"] {
            postgres.create_database(&format!("shop_{service}")).await;
        }
        // The simulator first, so that the payment services know its
        // port; its webhooks go to the first payment replica once it listens.
        let provider = match payments {
            Payments::Wallet => None,
            Payments::Provider => Some(ProviderProcess::start(&provider_faults(), seed).await),
        };
        let provider_env = provider
            .as_ref()
            .map(|provider| ProviderProcess::payment_env(provider.port, PROVIDER_TIMEOUT_MS))
            .unwrap_or_default();
        // Every replica at once, as a deployment starts them.
        let started = Instant::now();
        let processes =
            futures::future::join_all(shape.processes().iter().map(|&(name, replica)| {
                let url = postgres.url(&format!("shop_{name}"));
                let mut env = vec![
                    ("SAGA_DEADLINE_MS", DEADLINE_MS.to_string()),
                    ("ACK_WAIT_MS", ACK_WAIT_MS.to_string()),
                    ("STARTING_CREDIT_CENTS", STARTING_CREDIT.to_string()),
                    ("STREAM_REPLICAS", shape.stream_replicas().to_string()),
                ];
                if name == "payment" && payments == Payments::Provider {
                    env.extend(provider_env.iter().cloned());
                }
                let nats_url = nats_url.clone();
                async move {
                    let process = ServiceProcess::start(name, &url, &nats_url, &env).await;
                    ((name, replica), process)
                }
            }))
            .await
            .into_iter()
            .collect::<HashMap<_, _>>();
        println!(
            "  ({} service processes ready in {:.1} s)",
            shape.processes().len(),
            started.elapsed().as_secs_f64()
        );
        if let Some(provider) = &provider {
            provider
                .send_webhooks_to(&format!(
                    "http://127.0.0.1:{}/webhooks/provider",
                    processes[&("payment", 0)].http
                ))
                .await;
        }
        Self {
            shape,
            broker,
            postgres,
            processes,
            provider,
        }
    }

    async fn jetstream(&self) -> async_nats::jetstream::Context {
        let client = match &self.broker {
            Broker::Single(nats) => nats.client().await,
            Broker::Cluster(cluster) => cluster.client().await,
        };
        async_nats::jetstream::new(client)
    }

    fn channel(&self, name: &'static str, replica: usize) -> shop_auth::BearerChannel {
        processes::admin_channel(self.processes[&(name, replica)].endpoint())
    }

    /// The cluster, for a fault that only it can have.
    fn cluster(&mut self) -> &mut TestNatsCluster {
        match &mut self.broker {
            Broker::Cluster(cluster) => cluster,
            Broker::Single(_) => panic!("a cluster fault on one server"),
        }
    }

    /// Waits until every stream's replicas are back and current: a node
    /// fault is over only then.
    async fn streams_current(&self) {
        all_current(&self.jetstream().await, self.shape.stream_replicas()).await;
    }

    async fn inject(&mut self, fault: Fault, lasting: Duration) {
        match fault {
            Fault::Kill(name, replica) => {
                let process = self.processes.get_mut(&(name, replica)).unwrap();
                process.kill().await;
                tokio::time::sleep(lasting).await;
                process.restart().await;
            }
            Fault::Terminate(name, replica) => {
                let process = self.processes.get_mut(&(name, replica)).unwrap();
                let status = process.terminate().await;
                assert!(status.success(), "{name}#{replica} on SIGTERM: {status}");
                tokio::time::sleep(lasting).await;
                process.restart().await;
            }
            Fault::Pause(name, replica) => {
                let process = &self.processes[&(name, replica)];
                process.pause();
                tokio::time::sleep(lasting).await;
                process.resume();
            }
            Fault::RestartNats => {
                let Broker::Single(nats) = &mut self.broker else {
                    panic!("restarting the only server of a cluster");
                };
                nats.kill();
                tokio::time::sleep(lasting).await;
                nats.start_again().await;
            }
            Fault::RestartPostgres => {
                self.postgres.kill();
                tokio::time::sleep(lasting).await;
                self.postgres.start_again().await;
            }
            Fault::KillNatsNode(node) => {
                self.cluster().node(node).kill();
                tokio::time::sleep(lasting).await;
                self.cluster().node(node).start_again().await;
                self.streams_current().await;
            }
            Fault::PauseNatsNode(node) => {
                self.cluster().node(node).pause();
                tokio::time::sleep(lasting).await;
                self.cluster().node(node).resume();
                self.streams_current().await;
            }
            Fault::RollingNatsRestart => {
                for node in 0..CLUSTER_NODES {
                    self.cluster().node(node).stop();
                    tokio::time::sleep(lasting).await;
                    self.cluster().node(node).start_again().await;
                    self.streams_current().await;
                }
            }
        }
    }
}

/// What the driver saw.
#[derive(Default)]
struct Driven {
    placed: AtomicU64,
    retried_calls: AtomicU64,
}

/// Places `sagas` orders at `rate` per second from `clients` concurrent
/// clients spread over the order replicas `orders`, retrying each call (with its idempotency key) until the system
/// answers.
async fn drive(
    orders: Vec<OrderServiceClient<shop_auth::BearerChannel>>,
    users: Arc<Vec<String>>,
    sagas: usize,
    rate: f64,
    clients: usize,
    driven: Arc<Driven>,
) {
    let ticks = Arc::new(Mutex::new(tokio::time::interval(Duration::from_secs_f64(
        1.0 / rate,
    ))));
    let next = Arc::new(Mutex::new(0usize));
    let mut tasks = Vec::new();
    for client in 0..clients {
        let (mut orders, users, next, driven, ticks) = (
            // Each client keeps to one replica of the order service.
            orders[client % orders.len()].clone(),
            Arc::clone(&users),
            Arc::clone(&next),
            Arc::clone(&driven),
            Arc::clone(&ticks),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                ticks.lock().await.tick().await;
                let saga = {
                    let mut next = next.lock().await;
                    if *next == sagas {
                        return;
                    }
                    *next += 1;
                    *next - 1
                };
                // Mostly purchases that go through; every tenth is out of
                // stock, every tenth cannot be paid.
                let sku = match saga % 10 {
                    3 => "GONE",
                    7 => "YACHT",
                    _ => "LAMP",
                };
                let request = PlaceOrderRequest {
                    user_id: users[saga % users.len()].clone(),
                    items: vec![OrderItem {
                        sku: sku.into(),
                        quantity: 1 + (saga % 3) as i32,
                    }],
                    idempotency_key: format!("chaos-{saga}"),
                };
                loop {
                    match orders.place_order(request.clone()).await {
                        Ok(_) => break,
                        Err(status) => {
                            assert!(
                                matches!(
                                    status.code(),
                                    tonic::Code::Unavailable
                                        | tonic::Code::Unknown
                                        | tonic::Code::Cancelled
                                        | tonic::Code::DeadlineExceeded
                                ),
                                "PlaceOrder: {status}"
                            );
                            driven.retried_calls.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                driven.placed.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[derive(diesel::QueryableByName, Debug)]
struct Row {
    #[diesel(sql_type = Text)]
    key: String,
    #[diesel(sql_type = Text)]
    detail: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn rows(url: &str, sql: &str) -> Vec<Row> {
    // Here only: in scope, it would take over the atomics' `load`.
    use diesel_async::RunQueryDsl as _;
    let mut conn = AsyncPgConnection::establish(url).await.unwrap();
    diesel::sql_query(sql).load(&mut conn).await.unwrap()
}

/// (key, detail) -> n, of a query with those three columns.
async fn table(url: &str, sql: &str) -> BTreeMap<(String, String), i64> {
    rows(url, sql)
        .await
        .into_iter()
        .map(|row| ((row.key, row.detail), row.n))
        .collect()
}

/// Waits until no order is PENDING, no outbox row is unpublished and no
/// durable consumer has anything pending or unacknowledged.
async fn quiet(system: &System, urls: &HashMap<&str, String>) -> Duration {
    let started = Instant::now();
    let js = system.jetstream().await;
    loop {
        let pending = rows(
            &urls["order"],
            "SELECT '' AS key, '' AS detail, count(*) AS n FROM orders WHERE status = 'PENDING'",
        )
        .await[0]
            .n;
        // A provider's payment waiting for its charge's outcome or its refund.
        let unsettled = rows(
            &urls["payment"],
            "SELECT '' AS key, '' AS detail, count(*) AS n FROM payments \
             WHERE status IN ('PENDING', 'REFUNDING')",
        )
        .await[0]
            .n;
        let mut unpublished = 0;
        for url in urls.values() {
            unpublished += rows(
                url,
                "SELECT '' AS key, '' AS detail, count(*) AS n FROM outbox",
            )
            .await[0]
                .n;
        }
        let mut undelivered = 0;
        let mut outstanding = Vec::new();
        for (name, consumers) in DURABLES {
            // A request that times out while the cluster elects a leader
            // after the last fault says nothing yet: ask again.
            let Ok(mut stream) = js.get_stream(name).await else {
                outstanding.push(format!("{name}: no answer"));
                undelivered += 1;
                continue;
            };
            let Ok(state) = stream.info().await.map(|info| info.state.clone()) else {
                outstanding.push(format!("{name}: no answer"));
                undelivered += 1;
                continue;
            };
            for consumer in consumers {
                let Ok(info) = stream.consumer_info(*consumer).await else {
                    outstanding.push(format!("{name}/{consumer}: no answer"));
                    undelivered += 1;
                    continue;
                };
                let left = info.num_pending + info.num_ack_pending as u64;
                if left > 0 {
                    outstanding.push(format!(
                        "{name}/{consumer}: {} pending, {} unacknowledged, {} waiting pulls, delivered up to {}, acknowledged up to {}, stream {}..={}",
                        info.num_pending,
                        info.num_ack_pending,
                        info.num_waiting,
                        info.delivered.stream_sequence,
                        info.ack_floor.stream_sequence,
                        state.first_sequence,
                        state.last_sequence,
                    ));
                }
                undelivered += left;
            }
        }
        if pending == 0 && unsettled == 0 && unpublished == 0 && undelivered == 0 {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "not quiet after 120 s: {pending} orders pending, {unsettled} provider payments unsettled, {unpublished} outbox rows unpublished, {undelivered} deliveries outstanding:\n  {}",
            outstanding.join("\n  ")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Deliveries beyond the first of each message, over every durable.
async fn redeliveries(system: &System) -> u64 {
    let js = system.jetstream().await;
    let mut total = 0;
    for (stream, consumers) in DURABLES {
        let mut stream = js.get_stream(stream).await.unwrap();
        let messages = stream.info().await.unwrap().state.messages;
        for consumer in consumers {
            let info = stream.consumer_info(*consumer).await.unwrap();
            total += info.delivered.consumer_sequence.saturating_sub(messages);
        }
    }
    total
}

/// The design's invariants, read from the four databases and the streams.
async fn check(
    system: &System,
    urls: &HashMap<&str, String>,
    users: &[String],
) -> (BTreeMap<String, i64>, u64) {
    // Nothing dead-lettered, since none of these faults is a poison message.
    let js = system.jetstream().await;
    let dead = pg_jetstream::dead_letters::DeadLetters::open(js.clone())
        .await
        .unwrap()
        .list()
        .await
        .unwrap();
    assert!(
        dead.is_empty(),
        "{} dead letters after faults that are not poison, e.g. {} on {}: {}",
        dead.len(),
        dead[0].consumer,
        dead[0].subject,
        dead[0].reason
    );
    let orders = table(
        &urls["order"],
        "SELECT order_id::text AS key, status || ' ' || cancel_reason AS detail, total_cents AS n FROM orders",
    )
    .await;
    let payments = table(
        &urls["payment"],
        "SELECT order_id::text AS key, status AS detail, amount_cents AS n FROM payments",
    )
    .await;
    let mut outcomes = BTreeMap::new();
    for ((order_id, state), total) in &orders {
        let (status, reason) = state.split_once(' ').unwrap();
        assert!(
            status == "CONFIRMED" || status == "CANCELLED",
            "order {order_id} ended {status}"
        );
        let kind = match status {
            "CONFIRMED" => "confirmed".to_owned(),
            _ => format!(
                "cancelled: {}",
                reason.split(':').next().unwrap_or_default()
            ),
        };
        *outcomes.entry(kind).or_insert(0) += 1;
        let payment = payments
            .iter()
            .find(|((id, _), _)| id == order_id)
            .map(|((_, status), amount)| (status.as_str(), *amount));
        if status == "CONFIRMED" {
            assert_eq!(
                payment,
                Some(("CAPTURED", *total)),
                "confirmed order {order_id} must have exactly its capture"
            );
        } else {
            assert_ne!(
                payment.map(|(status, _)| status),
                Some("CAPTURED"),
                "cancelled order {order_id} keeps a capture"
            );
        }
    }

    // Per SKU: available + reserved + sold = stocked, nothing left
    // reserved, sold = the confirmed units.
    let sold_by_orders = table(
        &urls["order"],
        "SELECT i.sku AS key, '' AS detail, sum(i.quantity)::bigint AS n FROM order_items i \
         JOIN orders o USING (order_id) WHERE o.status = 'CONFIRMED' GROUP BY i.sku",
    )
    .await;
    for row in rows(
        &urls["inventory"],
        "SELECT sku AS key, available || ' ' || reserved || ' ' || sold AS detail, stocked AS n FROM products",
    )
    .await
    {
        let units: Vec<i64> = row.detail.split(' ').map(|n| n.parse().unwrap()).collect();
        let (available, reserved, sold) = (units[0], units[1], units[2]);
        let created = PRODUCTS.iter().find(|(sku, ..)| *sku == row.key).unwrap().2;
        assert_eq!(row.n, created, "{}: stocked", row.key);
        assert_eq!(available + reserved + sold, created, "{}: {units:?}", row.key);
        assert_eq!(reserved, 0, "{}: left reserved", row.key);
        let confirmed = sold_by_orders
            .get(&(row.key.clone(), String::new()))
            .copied()
            .unwrap_or(0);
        assert_eq!(sold, confirmed, "{}: sold vs confirmed units", row.key);
    }

    // Per user: balance + captured = starting credit (no deposits here);
    // with a provider, the wallets are never touched.
    let balances = table(
        &urls["payment"],
        if system.provider.is_some() {
            "SELECT a.user_id::text AS key, '' AS detail, a.balance_cents AS n FROM accounts a"
        } else {
            "SELECT a.user_id::text AS key, '' AS detail, a.balance_cents + coalesce(( \
               SELECT sum(p.amount_cents) FROM payments p \
               WHERE p.user_id = a.user_id AND p.status = 'CAPTURED'), 0)::bigint AS n FROM accounts a"
        },
    )
    .await;
    assert_eq!(balances.len(), users.len(), "one wallet per user");
    for ((user, _), total) in &balances {
        assert_eq!(
            *total, STARTING_CREDIT,
            "the money of {user} does not add up"
        );
    }

    // Every outbox row published.
    for (service, url) in urls {
        let unpublished = rows(
            url,
            "SELECT '' AS key, '' AS detail, count(*) AS n FROM outbox",
        )
        .await[0]
            .n;
        assert_eq!(unpublished, 0, "{service}: outbox rows never published");
    }

    if let Some(provider) = &system.provider {
        check_ledger(provider, &orders, &payments).await;
    }

    // The streams: no event emitted twice, every order ended once.
    let order_ids: Vec<String> = orders.keys().map(|(id, _)| id.clone()).collect();
    let copies = check_streams(&js, &order_ids).await;

    outcomes.insert("sagas".to_owned(), orders.len() as i64);
    (outcomes, copies)
}

/// The provider's ledger against the shop's view, per order: no order
/// charged twice; what the provider kept (charges minus refunds) is what
/// the shop captured and kept; a CONFIRMED order has exactly one charge,
/// of its total; a cancelled one keeps none.
async fn check_ledger(
    provider: &ProviderProcess,
    orders: &BTreeMap<(String, String), i64>,
    payments: &BTreeMap<(String, String), i64>,
) {
    let ledger = provider.ledger().await.expect("the simulator's ledger");
    let mut charges: HashMap<String, Vec<(i64, i64)>> = HashMap::new();
    for payment in ledger["payments"].as_array().unwrap() {
        if payment["status"] == "succeeded" {
            charges
                .entry(payment["reference"].as_str().unwrap().to_owned())
                .or_default()
                .push((
                    payment["amount_cents"].as_i64().unwrap(),
                    payment["refunded_cents"].as_i64().unwrap(),
                ));
        }
    }
    for ((order_id, state), total) in orders {
        let charged = charges.remove(order_id).unwrap_or_default();
        assert!(
            charged.len() <= 1,
            "order {order_id} charged twice: {charged:?}"
        );
        let kept: i64 = charged
            .iter()
            .map(|(amount, refunded)| amount - refunded)
            .sum();
        let shop = payments
            .iter()
            .find(|((id, _), _)| id == order_id)
            .map(|((_, status), amount)| (status.as_str(), *amount));
        let captured = match shop {
            Some(("CAPTURED", amount)) => amount,
            _ => 0,
        };
        assert_eq!(
            kept, captured,
            "order {order_id}: the provider kept {kept} cents, the shop captured {captured} ({shop:?})"
        );
        if state.starts_with("CONFIRMED") {
            assert_eq!(
                charged,
                [(*total, 0)],
                "confirmed order {order_id}: one charge of its total"
            );
        } else {
            assert_eq!(kept, 0, "cancelled order {order_id} keeps a charge");
        }
    }
    assert!(
        charges.is_empty(),
        "charges for orders the shop does not have: {charges:?}"
    );
    let refunds = ledger["refunds"].as_array().unwrap().len();
    let webhooks = &ledger["webhooks"];
    println!(
        "  provider: {} payments ({} succeeded), {refunds} refunds; webhooks {} sent, {} taken, {} refused, {} abandoned",
        ledger["payments"].as_array().unwrap().len(),
        ledger["payments"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["status"] == "succeeded")
            .count(),
        webhooks["attempts"],
        webhooks["delivered"],
        webhooks["refused"],
        webhooks["abandoned"],
    );
}

async fn run(
    shape: Shape,
    payments: Payments,
    sagas: usize,
    rate: f64,
    faults: Vec<(Duration, Fault, Duration)>,
) {
    let started = Instant::now();
    let seed = env_or("CHAOS_SEED", 0x5eed_2026_u64);
    let mut system = System::start(shape, payments, seed).await;
    let urls: HashMap<&str, String> = ["user", "order", "inventory", "payment"]
        .into_iter()
        .map(|service| (service, system.postgres.url(&format!("shop_{service}"))))
        .collect();
    let mut users_api = UserServiceClient::new(system.channel("user", 0));
    let mut users = Vec::new();
    for i in 0..USERS {
        let user = users_api
            .create_user(CreateUserRequest {
                email: format!("chaos-{i}@example.com"),
                name: format!("Chaos {i}"),
            })
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        users.push(user.user_id);
    }
    let mut inventory = InventoryServiceClient::new(system.channel("inventory", 0));
    for (sku, price, stock) in PRODUCTS {
        inventory
            .create_product(CreateProductRequest {
                sku: sku.into(),
                name: sku.into(),
                price_cents: price,
                stock,
            })
            .await
            .unwrap();
    }
    // The order service learns of the users from `user.created`.
    let known = Instant::now();
    while rows(
        &urls["order"],
        "SELECT '' AS key, '' AS detail, count(*) AS n FROM known_users",
    )
    .await[0]
        .n
        < USERS as i64
    {
        assert!(known.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let setup = started.elapsed();
    let driven = Arc::new(Driven::default());
    let order_replicas = shape
        .processes()
        .iter()
        .filter(|(name, _)| *name == "order")
        .map(|&(name, replica)| OrderServiceClient::new(system.channel(name, replica)))
        .collect();
    let driver = tokio::spawn(drive(
        order_replicas,
        Arc::new(users.clone()),
        sagas,
        rate,
        8,
        Arc::clone(&driven),
    ));
    let mut injected: BTreeMap<&str, u64> = BTreeMap::new();
    for (before, fault, lasting) in &faults {
        tokio::time::sleep(*before).await;
        system.inject(*fault, *lasting).await;
        *injected.entry(fault.kind()).or_insert(0) += 1;
    }
    let faults_done = started.elapsed();
    driver.await.unwrap();
    let driving_done = started.elapsed();
    println!("  (setup took {:.1} s)", setup.as_secs_f64());
    let to_quiet = quiet(&system, &urls).await;
    let durations = rows(
        &urls["order"],
        "SELECT status AS key, '' AS detail, \
           (percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM updated_at - created_at)) * 1000)::bigint \
           AS n FROM orders GROUP BY status",
    )
    .await;
    for row in &durations {
        println!("  median PlaceOrder-to-end of {}: {} ms", row.key, row.n);
    }
    let redelivered = redeliveries(&system).await;
    let (counts, copies) = check(&system, &urls, &users).await;

    println!(
        "chaos on {}, payments {}: {sagas} sagas, {} faults",
        match shape {
            Shape::Single => "one nats-server",
            Shape::Cluster => "a three-node JetStream cluster",
        },
        match payments {
            Payments::Wallet => "from the wallets",
            Payments::Provider => "through the provider simulator",
        },
        faults.len()
    );
    for (kind, n) in &injected {
        println!("  fault  {kind}: {n}");
    }
    for (outcome, n) in &counts {
        println!("  saga   {outcome}: {n}");
    }
    println!(
        "  PlaceOrder calls retried while a part was down: {}",
        driven.retried_calls.load(Ordering::Relaxed)
    );
    println!("  redeliveries seen by the durable consumers: {redelivered}");
    println!("  copies of a published event in the streams (absorbed by the inboxes): {copies}");
    println!(
        "  faults over at {:.1} s, orders placed at {:.1} s, quiet {:.1} s later",
        faults_done.as_secs_f64(),
        driving_done.as_secs_f64(),
        to_quiet.as_secs_f64()
    );
    assert_eq!(
        counts["sagas"], sagas as i64,
        "every placed order exists once"
    );
    assert_eq!(driven.placed.load(Ordering::Relaxed), sagas as u64);
    let declined = match payments {
        Payments::Wallet => "cancelled: insufficient funds",
        Payments::Provider => "cancelled: insufficient funds at the payment provider",
    };
    for outcome in ["confirmed", "cancelled: out of stock", declined] {
        assert!(
            counts.contains_key(outcome),
            "no saga ended {outcome}: {counts:?}"
        );
    }
    for (_, process) in system.processes.iter_mut() {
        assert!(process.terminate().await.success());
    }
}

fn chaos(shape: Shape) -> (usize, f64, Vec<(Duration, Fault, Duration)>) {
    let seed = env_or("CHAOS_SEED", 0x5eed_2026_u64);
    let sagas = env_or("CHAOS_SAGAS", 300usize);
    let faults = env_or("CHAOS_FAULTS", 10usize);
    let rate = env_or("CHAOS_RATE", 10.0f64);
    println!("chaos seed {seed} (CHAOS_SEED={seed} replays this schedule)");
    let schedule = schedule(seed, faults, shape);
    for (before, fault, lasting) in &schedule {
        println!("  after {before:?}: {fault:?} for {lasting:?}");
    }
    (sagas, rate, schedule)
}

#[tokio::test(flavor = "multi_thread")]
async fn sagas_stay_correct_through_kills_restarts_and_pauses() {
    let (sagas, rate, schedule) = chaos(Shape::Single);
    Box::pin(run(
        Shape::Single,
        Payments::Provider,
        sagas,
        rate,
        schedule,
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sagas_stay_correct_on_a_cluster_losing_nodes_with_every_service_replicated() {
    let (sagas, rate, schedule) = chaos(Shape::Cluster);
    Box::pin(run(
        Shape::Cluster,
        Payments::Provider,
        sagas,
        rate,
        schedule,
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wallet_sagas_stay_correct_through_kills_restarts_and_pauses() {
    let (sagas, rate, schedule) = chaos(Shape::Single);
    Box::pin(run(Shape::Single, Payments::Wallet, sagas, rate, schedule)).await;
}

#[test]
fn the_same_seed_gives_the_same_schedule() {
    for shape in [Shape::Single, Shape::Cluster] {
        assert_eq!(schedule(42, 20, shape), schedule(42, 20, shape));
        assert_ne!(schedule(42, 20, shape), schedule(43, 20, shape));
    }
    for (shape, kinds) in [(Shape::Single, 5), (Shape::Cluster, 7)] {
        let seen: std::collections::BTreeSet<_> = schedule(7, kinds, shape)
            .iter()
            .map(|(_, fault, _)| fault.kind())
            .collect();
        assert_eq!(
            seen.len(),
            kinds,
            "every kind of fault comes round: {seen:?}"
        );
    }
}
