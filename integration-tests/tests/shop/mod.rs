//! The four services in-process against a real NATS and PostgreSQL, with
//! gRPC clients, saga helpers and the design's invariant checker.

#![allow(
    dead_code,
    unreachable_pub,
    missing_debug_implementations,
    clippy::unwrap_used
)]

use std::collections::HashMap;
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
#[derive(Clone, Copy)]
pub struct Settings {
    pub saga_deadline: Duration,
    pub starting_credit: i64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            saga_deadline: Duration::from_secs(30),
            starting_credit: STARTING_CREDIT,
        }
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
            shop_service::init_logs(LogFormat::Text);
        }
        let infra = TestInfra::start().await;
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
        ServiceConfig::local(
            self.infra.postgres.url(&format!("shop_{service}")),
            self.infra.nats.url(),
            self.infra.issuer.auth_config(),
        )
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
            self.services[service].channel().await.unwrap(),
            shop_auth::Bearer::none(),
        )
    }

    /// A channel to `service` that sends `token`.
    pub async fn channel_with(&self, service: &str, token: &str) -> BearerChannel {
        shop_auth::with_token(self.services[service].channel().await.unwrap(), token)
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
        let payments = self.payments().await;
        eventually("the wallet opens", || {
            let mut payments = payments.clone();
            let user_id = user.user_id.clone();
            async move {
                payments
                    .get_account(GetAccountRequest { user_id })
                    .await
                    .is_ok()
            }
        })
        .await;
        self.users.insert(user.user_id.clone(), 0);
        user.user_id
    }

    /// Notes a user created some other way than [`Shop::create_user`], for
    /// the invariants.
    pub fn track_user(&mut self, user_id: &str) {
        self.users.insert(user_id.to_owned(), 0);
    }

    /// Notes a deposit, for the money invariant.
    pub fn deposited(&mut self, user_id: &str, amount: i64) {
        *self.users.get_mut(user_id).unwrap() += amount;
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
