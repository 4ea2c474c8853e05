//! `shopctl demo`: one saga of each kind against a running stack.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use shop_auth::BearerChannel;
use shop_proto::inventory::v1::CreateProductRequest;
use shop_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use shop_proto::order::v1::order_service_client::OrderServiceClient;
use shop_proto::order::v1::{GetOrderRequest, Order, OrderItem, OrderStatus, PlaceOrderRequest};
use shop_proto::user::v1::CreateUserRequest;
use shop_proto::user::v1::user_service_client::UserServiceClient;
use tonic::transport::Channel;

use crate::credentials::Credentials;

/// Options of `shopctl demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct Demo {
    /// The user service.
    #[arg(long, default_value = "http://localhost:50051")]
    user: String,
    /// The order service.
    #[arg(long, default_value = "http://localhost:50052")]
    order: String,
    /// The inventory service.
    #[arg(long, default_value = "http://localhost:50053")]
    inventory: String,
    /// The shop's administrator creates the user and the products; the
    /// customer places the orders with a token of their own.
    #[command(flatten)]
    credentials: Credentials,
    /// TLS, for `https://` endpoints.
    #[command(flatten)]
    tls: shopctl::client_tls::ClientTls,
}

async fn connect(tls: &shopctl::client_tls::ClientTls, endpoint: &str) -> anyhow::Result<Channel> {
    tls.endpoint(endpoint)?
        .connect()
        .await
        .with_context(|| format!("cannot reach {endpoint}: is the stack up (scripts/shopctl up)?"))
}

impl Demo {
    pub(crate) async fn run(self) -> anyhow::Result<()> {
        let admin = self.credentials.admin()?;
        let mut users = UserServiceClient::new(shop_auth::with_token(
            connect(&self.tls, &self.user).await?,
            &admin,
        ));
        let order_channel = connect(&self.tls, &self.order).await?;
        let mut inventory = InventoryServiceClient::new(shop_auth::with_token(
            connect(&self.tls, &self.inventory).await?,
            &admin,
        ));
        // Names of their own, so that the demo can run again on the same stack.
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
            .to_string();

        let email = format!("demo-{run}@example.com");
        let user = users
            .create_user(CreateUserRequest {
                email: email.clone(),
                name: "Demo Customer".into(),
            })
            .await?;
        let user_id = user
            .into_inner()
            .user
            .context("CreateUser returned no user")?
            .user_id;
        println!("user     {email} ({user_id})");
        let mut orders = OrderServiceClient::new(shop_auth::with_token(
            order_channel,
            &self.credentials.user(&user_id)?,
        ));
        let products = [
            ("LAMP", "Desk lamp", 1999, 5),
            ("LAST", "Last of its kind", 4999, 1),
            ("YACHT", "Yacht", 50_000_000, 1),
        ];
        for (sku, name, price_cents, stock) in products {
            let sku = format!("{sku}-{run}");
            inventory
                .create_product(CreateProductRequest {
                    sku: sku.clone(),
                    name: name.into(),
                    price_cents,
                    stock,
                })
                .await?;
            println!("product  {sku}: {name}, {price_cents} cents, {stock} in stock");
        }

        let cases = [
            ("a purchase that goes through", "LAMP", 2),
            ("more than the stock holds", "LAST", 2),
            ("more than the wallet holds", "YACHT", 1),
        ];
        for (what, sku, quantity) in cases {
            println!();
            println!("== {what}: {quantity} x {sku}-{run}");
            let request = PlaceOrderRequest {
                user_id: user_id.clone(),
                items: vec![OrderItem {
                    sku: format!("{sku}-{run}"),
                    quantity,
                }],
                idempotency_key: format!("demo-{run}-{sku}"),
            };
            let order = place(&mut orders, request).await?;
            let order = settle(&mut orders, &order.order_id).await?;
            print_order(&order);
        }
        Ok(())
    }
}

/// Places an order, waiting while the order service has not yet learned of
/// the new user (it does from `user.created`).
async fn place(
    orders: &mut OrderServiceClient<BearerChannel>,
    request: PlaceOrderRequest,
) -> anyhow::Result<Order> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match orders.place_order(request.clone()).await {
            Ok(response) => {
                return response
                    .into_inner()
                    .order
                    .context("PlaceOrder returned no order");
            }
            Err(status)
                if status.code() == tonic::Code::FailedPrecondition
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => return Err(status).context("PlaceOrder"),
        }
    }
}

async fn settle(
    orders: &mut OrderServiceClient<BearerChannel>,
    order_id: &str,
) -> anyhow::Result<Order> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let order = orders
            .get_order(GetOrderRequest {
                order_id: order_id.into(),
            })
            .await?
            .into_inner()
            .order
            .context("GetOrder returned no order")?;
        if order.status() != OrderStatus::Pending || Instant::now() > deadline {
            return Ok(order);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn print_order(order: &Order) {
    let status = order
        .status()
        .as_str_name()
        .trim_start_matches("ORDER_STATUS_");
    println!(
        "order    {}  {status}  total {} cents",
        order.order_id, order.total_cents
    );
    if !order.cancel_reason.is_empty() {
        println!("reason   {}", order.cancel_reason);
    }
    let start = order.created_at.as_ref().map_or(0, millis);
    for step in &order.steps {
        let at = step.occurred_at.as_ref().map_or(0, millis) - start;
        let detail = if step.detail.is_empty() {
            String::new()
        } else {
            format!("  ({})", step.detail)
        };
        println!("  +{at:>5} ms  {}{detail}", step.name);
    }
}

fn millis(at: &prost_types::Timestamp) -> i64 {
    at.seconds * 1000 + i64::from(at.nanos) / 1_000_000
}
