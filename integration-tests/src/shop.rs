//! The four services in-process against a real NATS and PostgreSQL, with
//! gRPC clients, saga helpers and the design's invariant checker.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shop_auth::BearerChannel;
use shop_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use shop_proto::inventory::v1::{CreateProductRequest, GetProductRequest};
use shop_proto::order::v1::order_service_client::OrderServiceClient;
use shop_proto::order::v1::{
    GetOrderRequest, ListOrdersRequest, Order, OrderItem, OrderStatus, PlaceOrderRequest,
};
use shop_proto::payment::v1::payment_service_client::PaymentServiceClient;
use shop_proto::payment::v1::{GetAccountRequest, GetPaymentRequest, PaymentStatus};
use shop_proto::user::v1::CreateUserRequest;
use shop_proto::user::v1::user_service_client::UserServiceClient;
use shop_service::{LogFormat, Running, ServiceConfig};
use shop_test_support::TestInfra;

pub const STARTING_CREDIT: i64 = 100_000;
const WAIT: Duration = Duration::from_secs(30);

/// How the shop is configured for a test.
#[derive(Clone)]
pub struct Settings {
    pub saga_deadline: Duration,
    pub starting_credit: i64,
    /// How long JetStream waits for a consumer's ack before redelivering.
    pub ack_wait: Duration,
    /// Serve TLS, with client certificates required, from these files.
    pub tls: Option<Arc<TestTls>>,
    /// PostgreSQL settings on top of the harness's (`name=value`).
    pub postgres: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            saga_deadline: Duration::from_secs(30),
            starting_credit: STARTING_CREDIT,
            ack_wait: Duration::from_secs(30),
            tls: None,
            postgres: Vec::new(),
        }
    }
}

/// A test CA, a server certificate for `localhost` and `127.0.0.1` and a
/// client certificate, all signed by the CA, in a temporary directory.
pub struct TestTls {
    dir: tempfile::TempDir,
    ca: String,
    client_cert: String,
    client_key: String,
}

impl TestTls {
    pub fn generate() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "shop test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()]);
        let (client_cert, client_key) = leaf(vec!["shop-test-client".into()]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("server.pem"), server_cert).unwrap();
        std::fs::write(dir.path().join("server.key"), server_key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("client.pem"), &client_cert).unwrap();
        std::fs::write(dir.path().join("client.key"), &client_key).unwrap();
        Self {
            dir,
            ca: ca.pem(),
            client_cert,
            client_key,
        }
    }

    /// One of the files: `ca.pem`, `server.pem`, `server.key`,
    /// `client.pem`, `client.key`.
    pub fn path(&self, file: &str) -> std::path::PathBuf {
        self.dir.path().join(file)
    }

    /// The servers' settings: this certificate, clients signed by this CA.
    pub fn config(&self) -> shop_service::TlsConfig {
        shop_service::TlsConfig {
            tls_cert: Some(self.dir.path().join("server.pem")),
            tls_key: Some(self.dir.path().join("server.key")),
            tls_client_ca: Some(self.dir.path().join("ca.pem")),
        }
    }

    /// A TLS channel to `addr` that trusts this CA, presenting `client`'s
    /// client certificate (or none).
    pub async fn channel(
        &self,
        addr: std::net::SocketAddr,
        client: Option<&TestTls>,
    ) -> Result<tonic::transport::Channel, tonic::transport::Error> {
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca))
            .domain_name("localhost");
        if let Some(client) = client {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                &client.client_cert,
                &client.client_key,
            ));
        }
        tonic::transport::Channel::from_shared(format!("https://localhost:{}", addr.port()))
            .unwrap()
            .tls_config(tls)?
            .connect()
            .await
    }

    /// A GET over TLS that trusts this CA: the whole response.
    pub async fn https_get(
        &self,
        addr: std::net::SocketAddr,
        path: &str,
    ) -> std::io::Result<String> {
        use rustls::pki_types::pem::PemObject as _;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from_pem_slice(self.ca.as_bytes()).unwrap())
            .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        tls.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        // A server may close without close_notify: keep what arrived.
        let _ = tls.read_to_end(&mut response).await;
        Ok(String::from_utf8_lossy(&response).into_owned())
    }
}

/// The running shop, and what the test did to it (for the invariants).
pub struct Shop {
    pub infra: TestInfra,
    settings: Settings,
    services: HashMap<&'static str, Running>,
    /// Stock put in per SKU: created plus added.
    stocked: HashMap<String, i64>,
    /// Users created, with their deposits.
    users: HashMap<String, i64>,
}

pub const SERVICES: [&str; 4] = ["user", "order", "inventory", "payment"];

impl Shop {
    pub async fn start(settings: Settings) -> Self {
        // Logs only when asked for: TEST_LOG=1 RUST_LOG=debug cargo nextest run ...
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = shop_service::init_logs("test", LogFormat::Text);
        }
        let infra = TestInfra::start_with_postgres_settings(&settings.postgres).await;
        for service in SERVICES {
            infra
                .postgres
                .create_database(&format!("shop_{service}"))
                .await;
        }
        let mut shop = Self {
            infra,
            settings,
            services: HashMap::new(),
            stocked: HashMap::new(),
            users: HashMap::new(),
        };
        let started = futures::future::join_all(SERVICES.map(|service| shop.launch(service))).await;
        for (service, running) in SERVICES.into_iter().zip(started) {
            shop.services.insert(service, running);
        }
        shop
    }

    fn config(&self, service: &str) -> ServiceConfig {
        ServiceConfig {
            tls: self
                .settings
                .tls
                .as_ref()
                .map(|tls| tls.config())
                .unwrap_or_default(),
            ack_wait_ms: self.settings.ack_wait.as_millis() as u64,
            ..ServiceConfig::local(
                self.infra.postgres.url(&format!("shop_{service}")),
                self.infra.nats.url(),
                self.infra.issuer.auth_config(),
            )
        }
    }

    /// Where `service` serves gRPC.
    pub fn grpc_addr(&self, service: &str) -> std::net::SocketAddr {
        self.services[service].grpc_addr()
    }

    /// Where `service` serves HTTP.
    pub fn http_addr(&self, service: &str) -> std::net::SocketAddr {
        self.services[service].http_addr()
    }

    async fn raw_channel(&self, service: &str) -> tonic::transport::Channel {
        match &self.settings.tls {
            Some(tls) => tls
                .channel(self.grpc_addr(service), Some(tls))
                .await
                .unwrap(),
            None => self.services[service].channel().await.unwrap(),
        }
    }

    async fn launch(&self, service: &'static str) -> Running {
        let config = self.config(service);
        let server = match service {
            "user" => shop_user::build(shop_user::Config { service: config }).await,
            "order" => {
                shop_order::build(shop_order::Config {
                    service: config,
                    saga_deadline_ms: self.settings.saga_deadline.as_millis() as u64,
                })
                .await
            }
            "inventory" => shop_inventory::build(shop_inventory::Config { service: config }).await,
            "payment" => {
                shop_payment::build(shop_payment::Config {
                    service: config,
                    starting_credit_cents: self.settings.starting_credit,
                    provider: Default::default(),
                })
                .await
            }
            other => panic!("no service {other}"),
        }
        .unwrap_or_else(|error| panic!("{service} did not start: {error:#}"));
        Running::spawn(server)
    }

    /// Stops a service gracefully (as on SIGTERM).
    pub async fn stop(&mut self, service: &'static str) {
        self.services.remove(service).unwrap().stop().await.unwrap();
    }

    /// Starts a stopped service again, on its database as it was.
    pub async fn restart(&mut self, service: &'static str) {
        assert!(!self.services.contains_key(service), "{service} is running");
        let running = self.launch(service).await;
        self.services.insert(service, running);
    }

    /// A channel to `service` that sends no token.
    pub async fn channel_without_token(&self, service: &str) -> BearerChannel {
        tonic::service::interceptor::InterceptedService::new(
            self.raw_channel(service).await,
            shop_auth::Bearer::none(),
        )
    }

    /// A channel to `service` that sends `token`.
    pub async fn channel_with(&self, service: &str, token: &str) -> BearerChannel {
        shop_auth::with_token(self.raw_channel(service).await, token)
    }

    async fn channel(&self, service: &str) -> BearerChannel {
        self.channel_with(service, &self.infra.issuer.admin_token())
            .await
    }

    /// The clients below call as the shop's administrator.
    pub async fn users(&self) -> UserServiceClient<BearerChannel> {
        UserServiceClient::new(self.channel("user").await)
    }

    pub async fn orders(&self) -> OrderServiceClient<BearerChannel> {
        OrderServiceClient::new(self.channel("order").await)
    }

    /// The order service as the customer `user_id`, with their own token.
    pub async fn orders_as(&self, user_id: &str) -> OrderServiceClient<BearerChannel> {
        OrderServiceClient::new(
            self.channel_with("order", &self.infra.issuer.user_token(user_id))
                .await,
        )
    }

    pub async fn inventory(&self) -> InventoryServiceClient<BearerChannel> {
        InventoryServiceClient::new(self.channel("inventory").await)
    }

    pub async fn payments(&self) -> PaymentServiceClient<BearerChannel> {
        PaymentServiceClient::new(self.channel("payment").await)
    }

    /// Creates a user and waits until the payment service opened the wallet.
    pub async fn create_user(&mut self, email: &str) -> String {
        let user = self
            .users()
            .await
            .create_user(CreateUserRequest {
                email: email.into(),
                name: "Test User".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        self.registered(&user.user_id).await;
        user.user_id
    }

    /// Waits until the payment service opened the wallet of `user_id`, and
    /// notes the user for the invariants (however they were created).
    pub async fn registered(&mut self, user_id: &str) {
        let payments = self.payments().await;
        eventually("the wallet opens", || {
            let mut payments = payments.clone();
            let user_id = user_id.to_owned();
            async move {
                payments
                    .get_account(GetAccountRequest { user_id })
                    .await
                    .is_ok()
            }
        })
        .await;
        self.users.insert(user_id.to_owned(), 0);
    }

    /// Notes a deposit, for the money invariant.
    pub fn deposited(&mut self, user_id: &str, amount: i64) {
        *self.users.get_mut(user_id).unwrap() += amount;
    }

    /// How many messages the dead-letter queue holds.
    pub async fn dead_letters(&self) -> u64 {
        self.infra.nats.stored("DLQ").await
    }

    /// Records a product made outside [`create_product`](Self::create_product).
    pub fn product_created(&mut self, sku: &str, stock: i64) {
        self.stocked.insert(sku.to_owned(), stock);
    }

    /// Records units added to a product.
    pub fn stock_added(&mut self, sku: &str, quantity: i64) {
        *self.stocked.get_mut(sku).unwrap() += quantity;
    }

    pub async fn create_product(&mut self, sku: &str, price_cents: i64, stock: i64) {
        self.inventory()
            .await
            .create_product(CreateProductRequest {
                sku: sku.into(),
                name: format!("Product {sku}"),
                price_cents,
                stock,
            })
            .await
            .unwrap();
        self.stocked.insert(sku.to_owned(), stock);
    }

    /// Places an order as the customer, with their own token, retrying
    /// while the order service has not yet learned of a just-created user.
    pub async fn place(
        &self,
        user_id: &str,
        items: &[(&str, i32)],
        key: &str,
    ) -> Result<Order, tonic::Status> {
        let request = PlaceOrderRequest {
            user_id: user_id.into(),
            items: items
                .iter()
                .map(|(sku, quantity)| OrderItem {
                    sku: (*sku).into(),
                    quantity: *quantity,
                })
                .collect(),
            idempotency_key: key.into(),
        };
        let mut orders = self.orders_as(user_id).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match orders.place_order(request.clone()).await {
                Err(status)
                    if status.code() == tonic::Code::FailedPrecondition
                        && self.users.contains_key(user_id)
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                result => return result.map(|response| response.into_inner().order.unwrap()),
            }
        }
    }

    pub async fn order(&self, order_id: &str) -> Order {
        self.orders()
            .await
            .get_order(GetOrderRequest {
                order_id: order_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .order
            .unwrap()
    }

    /// Waits until the order is CONFIRMED or CANCELLED.
    pub async fn settled(&self, order_id: &str) -> Order {
        let started = Instant::now();
        loop {
            let order = self.order(order_id).await;
            if order.status() != OrderStatus::Pending {
                return order;
            }
            assert!(
                started.elapsed() < WAIT,
                "order {order_id} still PENDING: {:?}",
                order.steps
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn balance(&self, user_id: &str) -> i64 {
        self.payments()
            .await
            .get_account(GetAccountRequest {
                user_id: user_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .account
            .unwrap()
            .balance_cents
    }

    pub async fn payment_status(&self, order_id: &str) -> Option<PaymentStatus> {
        match self
            .payments()
            .await
            .get_payment(GetPaymentRequest {
                order_id: order_id.into(),
            })
            .await
        {
            Ok(response) => Some(response.into_inner().payment.unwrap().status()),
            Err(status) if status.code() == tonic::Code::NotFound => None,
            Err(status) => panic!("GetPayment: {status}"),
        }
    }

    pub async fn product(&self, sku: &str) -> shop_proto::inventory::v1::Product {
        self.inventory()
            .await
            .get_product(GetProductRequest { sku: sku.into() })
            .await
            .unwrap()
            .into_inner()
            .product
            .unwrap()
    }

    /// The design's invariants, once every saga has ended:
    /// - every placed order is CONFIRMED or CANCELLED;
    /// - per SKU, available + reserved + sold = stock put in, nothing stays
    ///   reserved, and sold = the units of confirmed orders;
    /// - per user, balance = starting credit + deposits - confirmed totals;
    ///   every confirmed order has its capture, no cancelled order keeps one.
    pub async fn check_invariants(&self) {
        let mut sold: HashMap<String, i64> = HashMap::new();
        for (user_id, deposits) in &self.users {
            let mut orders = Vec::new();
            let mut token = String::new();
            loop {
                let page = self
                    .orders()
                    .await
                    .list_orders(ListOrdersRequest {
                        user_id: user_id.clone(),
                        page_size: 100,
                        page_token: token,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                orders.extend(page.orders);
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            let mut confirmed_total = 0;
            for order in &orders {
                let order = self.settled(&order.order_id).await;
                // Compensations run after the order settles: wait for them.
                let payment = eventually_value(
                    &format!("payment of {} settled", order.order_id),
                    || async {
                        let payment = self.payment_status(&order.order_id).await;
                        let settled = match order.status() {
                            OrderStatus::Confirmed => payment == Some(PaymentStatus::Captured),
                            _ => payment != Some(PaymentStatus::Captured),
                        };
                        settled.then_some(payment)
                    },
                )
                .await;
                if order.status() == OrderStatus::Confirmed {
                    confirmed_total += order.total_cents;
                    for item in &order.items {
                        *sold.entry(item.sku.clone()).or_default() += i64::from(item.quantity);
                    }
                    assert_eq!(
                        payment,
                        Some(PaymentStatus::Captured),
                        "confirmed order {} without capture",
                        order.order_id
                    );
                }
            }
            let expected = self.settings.starting_credit + deposits - confirmed_total;
            eventually(&format!("the balance of {user_id} adds up"), || async {
                self.balance(user_id).await == expected
            })
            .await;
        }
        for (sku, stocked) in &self.stocked {
            let want_sold = sold.get(sku).copied().unwrap_or(0);
            let product = eventually_value(&format!("{sku} settles"), || async {
                let product = self.product(sku).await;
                (product.reserved == 0 && product.sold == want_sold).then_some(product)
            })
            .await;
            assert_eq!(
                product.available + product.reserved + product.sold,
                *stocked,
                "units of {sku}: {product:?}"
            );
        }
    }
}

/// Polls `check` until it holds; panics after 30 s naming `what`.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_value(what, || {
        let fut = check();
        async move { fut.await.then_some(()) }
    })
    .await;
}

/// Polls `check` until it returns a value; panics after 30 s naming `what`.
pub async fn eventually_value<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(started.elapsed() < WAIT, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
