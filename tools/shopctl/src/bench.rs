//! `shopctl bench`: sagas per second and the latency from `PlaceOrder` to
//! the order's terminal event, against a running stack.
//!
//! The end of a saga is observed on NATS (`order.confirmed` /
//! `order.cancelled`), so measuring adds no load on the services.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use prost::Message as _;
use shop_auth::BearerChannel;
use shop_proto::inventory::v1::CreateProductRequest;
use shop_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use shop_proto::order::v1::order_service_client::OrderServiceClient;
use shop_proto::order::v1::{OrderCancelled, OrderConfirmed, OrderItem, PlaceOrderRequest};
use shop_proto::user::v1::CreateUserRequest;
use shop_proto::user::v1::user_service_client::UserServiceClient;
use tokio::sync::oneshot;
use tonic::transport::Channel;

use crate::credentials::Credentials;
use shopctl::nats::NatsArgs;

/// Options of `shopctl bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct Bench {
    /// Orders to place.
    #[arg(long, default_value_t = 2000)]
    orders: u64,
    /// Orders in flight at once (closed loop), or at most (with `--rate`).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Place orders at this fixed rate per second instead of as fast as
    /// `--concurrency` allows.
    #[arg(long)]
    rate: Option<f64>,
    /// Users to spread the orders over.
    #[arg(long, default_value_t = 20)]
    users: usize,
    /// Products to spread the orders over. One (the default) is a sale of a
    /// single item: every reservation queues for the same row.
    #[arg(long, default_value_t = 1)]
    products: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Once set up and warmed up, print `ready` and wait for a line on
    /// standard input before placing the measured orders: a tool that
    /// samples the stack's counters then measures the run alone
    /// (`scripts/cost`).
    #[arg(long)]
    wait_before_run: bool,
    /// The user service.
    #[arg(long, default_value = "http://localhost:50051")]
    user: String,
    /// The order service; several replicas comma-separated, over which the
    /// buyers are spread (buyer `i` keeps to replica `i mod n`).
    #[arg(long, default_value = "http://localhost:50052", value_delimiter = ',')]
    order: Vec<String>,
    /// The inventory service.
    #[arg(long, default_value = "http://localhost:50053")]
    inventory: String,
    /// NATS, where the sagas' ends are watched.
    #[command(flatten)]
    nats: NatsArgs,
    /// The administrator sets up products and buyers; each buyer places
    /// orders with a token of their own.
    #[command(flatten)]
    credentials: Credentials,
    /// TLS, for `https://` endpoints.
    #[command(flatten)]
    tls: shopctl::client_tls::ClientTls,
}

impl Bench {
    pub(crate) async fn run(self) -> anyhow::Result<()> {
        let channel = |endpoint: &str| -> anyhow::Result<Channel> {
            Ok(self.tls.endpoint(endpoint)?.connect_lazy())
        };
        let admin = self.credentials.admin()?;
        let mut users = UserServiceClient::new(shop_auth::with_token(channel(&self.user)?, &admin));
        let mut inventory =
            InventoryServiceClient::new(shop_auth::with_token(channel(&self.inventory)?, &admin));
        let order_channels = self
            .order
            .iter()
            .map(|endpoint| channel(endpoint))
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(!order_channels.is_empty(), "--order names no endpoint");
        let nats = self.nats.connect().await?;

        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis();
        let skus: Vec<String> = (0..self.products.max(1))
            .map(|i| format!("BENCH-{run}-{i}"))
            .collect();
        let stock = i64::try_from(self.orders)?
            .saturating_add(i64::try_from(self.users)?)
            .saturating_add(1);
        for sku in &skus {
            inventory
                .create_product(CreateProductRequest {
                    sku: sku.clone(),
                    name: "Bench item".into(),
                    price_cents: 1,
                    stock,
                })
                .await
                .context("creating the bench products: is the stack up (scripts/shopctl up)?")?;
        }
        let mut buyers = Vec::new();
        for i in 0..self.users.max(1) {
            let request = CreateUserRequest {
                email: format!("bench-{run}-{i}@example.com"),
                name: format!("Bench {i}"),
            };
            buyers.push(
                users
                    .create_user(request)
                    .await?
                    .into_inner()
                    .user
                    .context("no user")?
                    .user_id,
            );
        }

        // One client per buyer, each with the buyer's own token.
        let orders = buyers
            .iter()
            .enumerate()
            .map(|(i, buyer)| {
                Ok(OrderServiceClient::new(shop_auth::with_token(
                    order_channels[i % order_channels.len()].clone(),
                    &self.credentials.user(buyer)?,
                )))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;

        // Every saga ends with one of these; the waiter for its order is told.
        let ends_seen = Ends::default();
        let mut ends = futures::stream::select(
            nats.subscribe("order.confirmed").await?.map(|m| (true, m)),
            nats.subscribe("order.cancelled").await?.map(|m| (false, m)),
        );
        let watcher = {
            let ends_seen = ends_seen.clone();
            tokio::spawn(async move {
                while let Some((confirmed, message)) = ends.next().await {
                    let order_id = if confirmed {
                        OrderConfirmed::decode(message.payload).map(|e| e.order_id)
                    } else {
                        OrderCancelled::decode(message.payload).map(|e| e.order_id)
                    };
                    let Ok(order_id) = order_id else { continue };
                    ends_seen.ended(order_id, confirmed);
                }
            })
        };
        warm_up(&orders, &ends_seen, &buyers, &skus[0], run).await?;
        if self.wait_before_run {
            println!("ready");
            tokio::task::spawn_blocking(|| std::io::stdin().read_line(&mut String::new()))
                .await?
                .context("waiting for the go-ahead on standard input")?;
        }

        let progress = indicatif::ProgressBar::new(self.orders);
        progress.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} sagas  {per_sec}  eta {eta}",
            )
            .expect("a valid template"),
        );
        let histogram = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
        let confirmed = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let permits = Arc::new(tokio::sync::Semaphore::new(self.concurrency.max(1)));
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            if index >= self.orders {
                break;
            }
            if let Some(rate) = self.rate {
                tokio::time::sleep_until(
                    (started + Duration::from_secs_f64(index as f64 / rate)).into(),
                )
                .await;
            }
            let permit = Arc::clone(&permits).acquire_owned().await?;
            let mut orders = orders[index as usize % orders.len()].clone();
            let request = PlaceOrderRequest {
                user_id: buyers[index as usize % buyers.len()].clone(),
                items: vec![OrderItem {
                    sku: skus[index as usize % skus.len()].clone(),
                    quantity: 1,
                }],
                idempotency_key: format!("bench-{run}-{index}"),
            };
            let (ends_seen, histogram, confirmed, failed, progress) = (
                ends_seen.clone(),
                Arc::clone(&histogram),
                Arc::clone(&confirmed),
                Arc::clone(&failed),
                progress.clone(),
            );
            tasks.spawn(async move {
                let placed = Instant::now();
                let order_id = match orders.place_order(request).await {
                    Ok(response) => response
                        .into_inner()
                        .order
                        .map(|o| o.order_id)
                        .unwrap_or_default(),
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        progress.inc(1);
                        return;
                    }
                };
                let ended =
                    tokio::time::timeout(Duration::from_secs(60), ends_seen.wait(order_id)).await;
                match ended {
                    Ok(Ok(ok)) => {
                        if ok {
                            confirmed.fetch_add(1, Ordering::Relaxed);
                        }
                        let micros =
                            u64::try_from(placed.elapsed().as_micros()).unwrap_or(u64::MAX);
                        let _ = histogram.lock().expect("not poisoned").record(micros);
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                progress.inc(1);
                drop(permit);
            });
        }
        while tasks.join_next().await.is_some() {}
        let elapsed = started.elapsed();
        progress.finish_and_clear();
        watcher.abort();

        let histogram = histogram.lock().expect("not poisoned").clone();
        let ended = histogram.len();
        let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        let rate = ended as f64 / elapsed.as_secs_f64();
        let (confirmed, failed) = (
            confirmed.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
        );
        if self.json {
            println!(
                "{{\"orders\":{},\"ended\":{ended},\"confirmed\":{confirmed},\"failed\":{failed},\"seconds\":{:.3},\"sagas_per_second\":{rate:.1},\"latency_ms\":{{\"p50\":{:.2},\"p95\":{:.2},\"p99\":{:.2},\"max\":{:.2}}}}}",
                self.orders,
                elapsed.as_secs_f64(),
                ms(0.5),
                ms(0.95),
                ms(0.99),
                histogram.max() as f64 / 1000.0
            );
        } else {
            println!(
                "sagas        {ended} ended ({confirmed} confirmed), {failed} failed or timed out, of {}",
                self.orders
            );
            println!("time         {:.2} s", elapsed.as_secs_f64());
            println!("throughput   {rate:.0} sagas/s");
            println!("PlaceOrder -> terminal event");
            println!(
                "  p50 {:.2} ms   p95 {:.2} ms   p99 {:.2} ms   max {:.2} ms",
                ms(0.5),
                ms(0.95),
                ms(0.99),
                histogram.max() as f64 / 1000.0
            );
        }
        anyhow::ensure!(
            failed == 0,
            "{failed} sagas failed or did not end within 60 s"
        );
        Ok(())
    }
}

/// Places one order per buyer, retrying while the order service has not yet
/// learned of the new user (from `user.created`), and waits for its end: the
/// measured run then starts warm and with every user known.
async fn warm_up(
    orders: &[OrderServiceClient<BearerChannel>],
    ends: &Ends,
    buyers: &[String],
    sku: &str,
    run: u128,
) -> anyhow::Result<()> {
    for (i, (buyer, orders)) in buyers.iter().zip(orders).enumerate() {
        let request = PlaceOrderRequest {
            user_id: buyer.clone(),
            items: vec![OrderItem {
                sku: sku.into(),
                quantity: 1,
            }],
            idempotency_key: format!("bench-{run}-warm-{i}"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let order = loop {
            match orders.clone().place_order(request.clone()).await {
                Ok(response) => break response.into_inner().order.context("no order")?,
                Err(status)
                    if status.code() == tonic::Code::FailedPrecondition
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(status) => return Err(status).context("warm-up PlaceOrder"),
            }
        };
        tokio::time::timeout(Duration::from_secs(60), ends.wait(order.order_id))
            .await
            .context("a warm-up saga did not end within 60 s")??;
    }
    Ok(())
}

/// The sagas' ends as seen on NATS, matched to the orders waiting for them.
#[derive(Default, Clone)]
struct Ends(Arc<Mutex<EndsInner>>);

#[derive(Default)]
struct EndsInner {
    waiting: HashMap<String, oneshot::Sender<bool>>,
    /// Ends seen before anyone waited for them.
    early: HashMap<String, bool>,
}

impl Ends {
    fn ended(&self, order_id: String, confirmed: bool) {
        let mut inner = self.0.lock().expect("not poisoned");
        match inner.waiting.remove(&order_id) {
            Some(waiter) => {
                let _ = waiter.send(confirmed);
            }
            None => {
                inner.early.insert(order_id, confirmed);
            }
        }
    }

    /// Whether the order was confirmed, once its saga has ended.
    async fn wait(&self, order_id: String) -> anyhow::Result<bool> {
        let told = {
            let mut inner = self.0.lock().expect("not poisoned");
            if let Some(confirmed) = inner.early.remove(&order_id) {
                return Ok(confirmed);
            }
            let (tell, told) = oneshot::channel();
            inner.waiting.insert(order_id, tell);
            told
        };
        Ok(told.await?)
    }
}
