//! The services as separate OS processes, from their real binaries, each on
//! free ports of its own: what a deployment runs.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use shop_proto::order::v1::order_service_client::OrderServiceClient;
use shop_proto::order::v1::{GetOrderRequest, Order, OrderStatus, PlaceOrderRequest};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The service binaries, and the payment provider simulator's.
pub const BINARIES: [&str; 5] = [
    "user-svc",
    "order-svc",
    "inventory-svc",
    "payment-svc",
    "provider-sim",
];

/// The directory holding the service binaries. `cargo nextest run
/// --workspace` builds them with the tests; when one is missing or older
/// than a source file of the services, they are built here (a package's
/// tests get only its own binaries built).
pub fn binaries() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // <target>/<profile>/deps/<this test>
        let exe = std::env::current_exe().unwrap();
        let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let newest_source = [
            "services",
            "shared",
            "migrations",
            "proto",
            "tools/provider-sim",
            "Cargo.lock",
        ]
        .iter()
        .filter_map(|part| newest(&root.join(part)))
        .max();
        let stale = BINARIES.iter().any(|binary| {
            let built = std::fs::metadata(dir.join(binary)).and_then(|m| m.modified());
            match (built, newest_source) {
                (Ok(built), Some(source)) => built < source,
                (Ok(_), None) => false,
                (Err(_), _) => true,
            }
        });
        if stale {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut command = std::process::Command::new(cargo);
            command.args(["build", "--quiet", "--bins"]);
            if dir.ends_with("release") {
                command.arg("--release");
            }
            let status = command
                .args(["-p", "shop-user", "-p", "shop-order"])
                .args(["-p", "shop-inventory", "-p", "shop-payment"])
                .args(["-p", "shop-provider-sim"])
                .current_dir(&root)
                .status()
                .expect("cargo runs");
            assert!(status.success(), "building the service binaries failed");
        }
        dir
    })
}

/// The newest modification time of a file under `path`.
fn newest(path: &Path) -> Option<std::time::SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_file() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| newest(&entry.path()))
        .max()
}

/// The key every service process of a test run trusts.
pub fn issuer() -> &'static shop_auth::LocalIssuer {
    static ISSUER: OnceLock<shop_auth::LocalIssuer> = OnceLock::new();
    ISSUER.get_or_init(shop_auth::LocalIssuer::generate)
}

/// A lazy channel to `endpoint` that calls as the administrator.
pub fn admin_channel(endpoint: String) -> shop_auth::BearerChannel {
    shop_auth::with_token(
        tonic::transport::Channel::from_shared(endpoint)
            .unwrap()
            .connect_lazy(),
        &issuer().admin_token(),
    )
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One running service process.
pub struct ServiceProcess {
    pub name: &'static str,
    pub grpc: u16,
    pub http: u16,
    database_url: String,
    nats_url: String,
    env: Vec<(String, String)>,
    child: tokio::process::Child,
}

impl ServiceProcess {
    /// Starts `<name>-svc` on `database_url` and `nats_url`, with `env`
    /// added, and waits until it reports ready.
    pub async fn start(
        name: &'static str,
        database_url: &str,
        nats_url: &str,
        env: &[(&str, String)],
    ) -> Self {
        let mut process = Self::launch(name, database_url, nats_url, env);
        process.wait_ready().await;
        process
    }

    /// Starts `<name>-svc` as [`start`](Self::start) does, without waiting.
    pub fn launch(
        name: &'static str,
        database_url: &str,
        nats_url: &str,
        env: &[(&str, String)],
    ) -> Self {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        let (grpc, http) = (free_port(), free_port());
        let child = spawn(name, database_url, nats_url, &env, grpc, http);
        Self {
            name,
            grpc,
            http,
            database_url: database_url.to_owned(),
            nats_url: nats_url.to_owned(),
            env,
            child,
        }
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Whether `/readyz` answers 200 now.
    pub async fn ready(&self) -> bool {
        http_get(self.http, "/readyz")
            .await
            .is_some_and(|(status, _)| status == 200)
    }

    /// SIGKILL, as a crash would.
    pub async fn kill(&mut self) {
        self.signal("KILL");
        let _ = self.child.wait().await;
    }

    /// Starts the process again, on the same ports, after it exited.
    pub async fn restart(&mut self) {
        self.child = spawn(
            self.name,
            &self.database_url,
            &self.nats_url,
            &self.env,
            self.grpc,
            self.http,
        );
        self.wait_ready().await;
    }

    /// SIGSTOP: the process hangs, holding what it was doing.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// SIGCONT: it carries on with stale work.
    pub fn resume(&self) {
        self.signal("CONT");
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            if http_get(self.http, "/readyz")
                .await
                .is_some_and(|(status, _)| status == 200)
            {
                return;
            }
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "{}-svc exited",
                self.name
            );
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{}-svc never became ready",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc)
    }

    /// Sends SIGTERM and waits for the exit.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the service exits within 30 s of SIGTERM")
            .unwrap()
    }

    fn signal(&self, signal: &str) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args([format!("-{signal}"), pid.to_string()])
                .status();
        }
    }
}

fn spawn(
    name: &str,
    database_url: &str,
    nats_url: &str,
    env: &[(String, String)],
    grpc: u16,
    http: u16,
) -> tokio::process::Child {
    tokio::process::Command::new(binaries().join(format!("{name}-svc")))
        .env("DATABASE_URL", database_url)
        .env("NATS_URL", nats_url)
        .env("GRPC_ADDR", format!("127.0.0.1:{grpc}"))
        .env("HTTP_ADDR", format!("127.0.0.1:{http}"))
        .env("LOG_FORMAT", "json")
        .env("JWKS", issuer().jwks())
        .env("JWT_ISSUER", shop_auth::LOCAL_ISSUER)
        // Wallets with something to spend (the service's default is 0);
        // a test's own `env` may say otherwise.
        .env("STARTING_CREDIT_CENTS", "100000")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(if std::env::var_os("TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {name}-svc: {error}"))
}

/// A GET over plain HTTP/1.1: the status and the body, or `None` when
/// nothing answers.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_get_as(port, path, None).await
}

/// [`http_get`] with `Authorization: Bearer <token>`.
pub async fn http_get_as(port: u16, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let authorization = token
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{authorization}Connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .ok()?
        .ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// The API key and webhook secret of the provider simulators tests start.
pub const PROVIDER_KEY: &str = "sk_test_processes";
pub const PROVIDER_SECRET: &str = "whsec_test_processes";

/// The payment provider simulator, `provider-sim`, as a process.
#[derive(Debug)]
pub struct ProviderProcess {
    pub port: u16,
    _child: tokio::process::Child,
}

impl ProviderProcess {
    /// Starts it on a port of its own choosing with `faults` (JSON) and
    /// `seed`, webhooks going nowhere until [`send_webhooks_to`]
    /// (Self::send_webhooks_to), and waits until it answers.
    pub async fn start(faults: &str, seed: u64) -> Self {
        use tokio::io::AsyncBufReadExt as _;
        let mut child = tokio::process::Command::new(binaries().join("provider-sim"))
            .args(["--listen", "127.0.0.1:0"])
            .args(["--faults", faults])
            .args(["--seed", &seed.to_string()])
            .env("PROVIDER_API_KEY", PROVIDER_KEY)
            .env("PROVIDER_WEBHOOK_SECRET", PROVIDER_SECRET)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("provider-sim starts");
        let stdout = child.stdout.take().expect("piped");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("provider-sim says where it listens within 10 s")
            .unwrap()
            .expect("provider-sim printed its address");
        let port = line
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        // Keep reading, so that the pipe never fills.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let provider = Self {
            port,
            _child: child,
        };
        let started = Instant::now();
        while provider.ledger().await.is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "provider-sim never answered"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        provider
    }

    /// Sends its webhooks to `url` from now on.
    pub async fn send_webhooks_to(&self, url: &str) {
        let body = serde_json::json!({ "url": url }).to_string();
        let request = format!(
            "PUT /_sim/webhook HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {PROVIDER_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }

    /// Its `GET /_sim/ledger`: every payment and refund, and the webhooks'
    /// counts.
    pub async fn ledger(&self) -> Option<serde_json::Value> {
        let (status, body) = http_get_as(self.port, "/_sim/ledger", Some(PROVIDER_KEY)).await?;
        (status == 200)
            .then(|| serde_json::from_str(&body).ok())
            .flatten()
    }

    /// The settings that make a payment service charge through it.
    pub fn payment_env(port: u16, timeout_ms: u64) -> Vec<(&'static str, String)> {
        vec![
            ("PAYMENT_PROVIDER", "http".to_owned()),
            ("PROVIDER_URL", format!("http://127.0.0.1:{port}")),
            ("PROVIDER_API_KEY", PROVIDER_KEY.to_owned()),
            ("PROVIDER_WEBHOOK_SECRET", PROVIDER_SECRET.to_owned()),
            ("PROVIDER_TIMEOUT_MS", timeout_ms.to_string()),
        ]
    }
}

/// Registers a user through the user service at `endpoint`, as the
/// administrator; returns the new user's id.
pub async fn create_user(endpoint: String, email: &str) -> String {
    use shop_proto::user::v1::CreateUserRequest;
    use shop_proto::user::v1::user_service_client::UserServiceClient;
    UserServiceClient::new(admin_channel(endpoint))
        .create_user(CreateUserRequest {
            email: email.into(),
            name: "Test User".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
        .user_id
}

/// Adds a product through the inventory service at `endpoint`, as the
/// administrator.
pub async fn create_product(endpoint: String, sku: &str, price_cents: i64, stock: i64) {
    use shop_proto::inventory::v1::CreateProductRequest;
    use shop_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
    InventoryServiceClient::new(admin_channel(endpoint))
        .create_product(CreateProductRequest {
            sku: sku.into(),
            name: sku.into(),
            price_cents,
            stock,
        })
        .await
        .unwrap();
}

/// Places an order, retrying while the order service has not yet learned of
/// a just-created user (from `user.created`).
pub async fn place_order(
    orders: &mut OrderServiceClient<shop_auth::BearerChannel>,
    request: tonic::Request<PlaceOrderRequest>,
) -> Order {
    let (metadata, extensions, message) = request.into_parts();
    let started = Instant::now();
    loop {
        let attempt =
            tonic::Request::from_parts(metadata.clone(), extensions.clone(), message.clone());
        match orders.place_order(attempt).await {
            Ok(response) => return response.into_inner().order.unwrap(),
            Err(status)
                if status.code() == tonic::Code::FailedPrecondition
                    && started.elapsed() < Duration::from_secs(10) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("PlaceOrder: {status}"),
        }
    }
}

/// Waits until the order has left PENDING, and returns it.
pub async fn settled(
    orders: &mut OrderServiceClient<shop_auth::BearerChannel>,
    order_id: &str,
) -> Order {
    let started = Instant::now();
    loop {
        let order = orders
            .get_order(GetOrderRequest {
                order_id: order_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .order
            .unwrap();
        if order.status() != OrderStatus::Pending {
            return order;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "still PENDING: {order:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The four event streams of the saga.
pub const EVENT_STREAMS: [&str; 4] = ["USER", "ORDER", "INVENTORY", "PAYMENT"];

/// The leader of `stream`'s replicas, once it has one.
pub async fn leader_of(js: &async_nats::jetstream::Context, stream: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut handle) = js.get_stream(stream).await
            && let Ok(info) = handle.info().await
            && let Some(leader) = info.cluster.as_ref().and_then(|c| c.leader.clone())
        {
            return leader;
        }
        assert!(Instant::now() < deadline, "{stream} has no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every event stream has a leader and its other
/// `replicas - 1` replicas are online and current.
pub async fn all_current(js: &async_nats::jetstream::Context, replicas: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    'wait: loop {
        assert!(
            Instant::now() < deadline,
            "the streams' replicas did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        for stream in EVENT_STREAMS {
            let Ok(mut handle) = js.get_stream(stream).await else {
                continue 'wait;
            };
            let Ok(info) = handle.info().await else {
                continue 'wait;
            };
            let Some(cluster) = &info.cluster else {
                continue 'wait;
            };
            assert_eq!(
                info.config.num_replicas, replicas,
                "{stream} has the wrong replica count"
            );
            if cluster.leader.is_none()
                || cluster.replicas.len() != replicas - 1
                || cluster
                    .replicas
                    .iter()
                    .any(|peer| !peer.current || peer.offline)
            {
                continue 'wait;
            }
        }
        return;
    }
}

/// One message of an event stream, by its envelope's headers.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// `Nats-Msg-Id`, which the relay sets to the event's id.
    pub msg_id: String,
    pub event_id: String,
    pub subject: String,
    pub kind: String,
    pub causation_id: String,
    pub correlation_id: String,
}

/// Every message of `stream`, in order.
pub async fn stream_events(js: &async_nats::jetstream::Context, stream: &str) -> Vec<StoredEvent> {
    use pg_jetstream::envelope::headers;
    let mut handle = js.get_stream(stream).await.unwrap();
    let state = handle.info().await.unwrap().state.clone();
    let mut events = Vec::new();
    if state.messages == 0 {
        return events;
    }
    for sequence in state.first_sequence..=state.last_sequence {
        let message = handle.get_raw_message(sequence).await.unwrap();
        let header = |name: &str| {
            message
                .headers
                .get(name)
                .map(|value| value.as_str().to_owned())
                .unwrap_or_default()
        };
        events.push(StoredEvent {
            msg_id: header(headers::NATS_MSG_ID),
            event_id: header(headers::ID),
            subject: message.subject.to_string(),
            kind: header(headers::TYPE),
            causation_id: header(headers::CAUSATION_ID),
            correlation_id: header(headers::CORRELATION_ID),
        });
    }
    events
}

/// What the streams hold, checked: every message carries its event's id as
/// `Nats-Msg-Id`; no event was emitted twice (two ids of one type for one
/// cause, or for one correlation where there is no cause); and every order
/// in `orders` ended in exactly one `order.confirmed` or `order.cancelled`.
/// Returns the copies of one id that a stream holds beyond the first: a
/// consumer's inbox absorbs them.
pub async fn check_streams(js: &async_nats::jetstream::Context, orders: &[String]) -> u64 {
    use std::collections::{HashMap, HashSet};
    let mut copies = 0;
    let mut ends: HashMap<String, HashSet<String>> = HashMap::new();
    for stream in EVENT_STREAMS {
        let mut seen: HashMap<String, StoredEvent> = HashMap::new();
        let mut emitted: HashMap<(String, String), HashSet<String>> = HashMap::new();
        for event in stream_events(js, stream).await {
            assert!(
                !event.event_id.is_empty() && event.msg_id == event.event_id,
                "{stream}: a message whose Nats-Msg-Id is not its event id: {event:?}"
            );
            if let Some(first) = seen.get(&event.event_id) {
                assert_eq!(
                    (&first.subject, &first.kind, &first.causation_id),
                    (&event.subject, &event.kind, &event.causation_id),
                    "{stream}: two events under one id"
                );
                copies += 1;
                continue;
            }
            // Events of a call (an order placed, a user created) have no
            // cause but the entity they correlate with.
            let cause = if !event.causation_id.is_empty() {
                Some(event.causation_id.clone())
            } else if !event.correlation_id.is_empty() {
                Some(format!("correlation {}", event.correlation_id))
            } else {
                None
            };
            if let Some(cause) = cause {
                emitted
                    .entry((event.kind.clone(), cause))
                    .or_default()
                    .insert(event.event_id.clone());
            }
            if event.subject == "order.confirmed" || event.subject == "order.cancelled" {
                ends.entry(event.correlation_id.clone())
                    .or_default()
                    .insert(event.event_id.clone());
            }
            seen.insert(event.event_id.clone(), event);
        }
        for ((kind, cause), ids) in &emitted {
            assert_eq!(
                ids.len(),
                1,
                "{stream}: {kind} emitted {} times for {cause}",
                ids.len()
            );
        }
    }
    for order in orders {
        let n = ends.get(order).map_or(0, HashSet::len);
        assert_eq!(n, 1, "order {order} ended {n} times in the ORDER stream");
    }
    assert_eq!(ends.len(), orders.len(), "ends of orders never placed");
    copies
}
