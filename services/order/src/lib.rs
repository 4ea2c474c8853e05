//! The order service: takes orders (`shop.order.v1.OrderService`) and
//! follows each saga: PlaceOrder, the confirmation or cancellation, and the deadline.
//!
//! - consumes `user.created` (remember the user), `inventory.reserved`
//!   (record the total), `payment.completed` (confirm), `inventory.rejected`
//!   and `payment.failed` (cancel);
//! - emits `order.placed`, `order.confirmed`, `order.cancelled` (also when a
//!   PENDING order passes its deadline, reason `timeout`).
//!
//! Modules: `domain` (validation and the order's state machine, pure;
//! public so that the saga model test drives it), `app`
//! (use cases, saga steps, the deadline sweeper: one file each), `store`
//! (every SQL statement), `events` (the routing table), `grpc` (protobuf in
//! and out), `metrics`, `schema` (`migrations/order/`).

mod app;
pub mod domain;
mod events;
mod grpc;
mod metrics;
mod schema;
mod store;

use std::time::Duration;

use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use shop_service::{Identity, Infrastructure, Ports, Server, ServiceConfig};

/// The order service: its name, its stream, its default ports.
pub const SERVICE: Identity = Identity {
    name: "order",
    stream: "ORDER",
    ports: Ports {
        grpc: 50052,
        http: 9102,
    },
};

/// The service's schema, from `migrations/order/`.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/order");

/// The order service's configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "order-svc", about = "The shop's order service")]
pub struct Config {
    /// What every service takes.
    #[command(flatten)]
    pub service: ServiceConfig,
    /// How long a saga may run before a PENDING order is cancelled with
    /// reason `timeout`, in milliseconds.
    #[arg(long, env = "SAGA_DEADLINE_MS", default_value_t = 30_000)]
    pub saga_deadline_ms: u64,
}

/// Starts the order service's infrastructure and binds its servers.
pub async fn build(config: Config) -> anyhow::Result<Server> {
    let mut infra = Infrastructure::start(&config.service, &SERVICE, MIGRATIONS).await?;
    let sagas = metrics::SagaMetrics::default();
    infra.register_metrics(|registry| sagas.register(registry));
    let handlers = events::HandlerState {
        metrics: sagas.clone(),
    };
    let messaging = infra
        .messaging()
        .consume("USER", events::user_events())
        .consume("INVENTORY", events::inventory_events())
        .consume("PAYMENT", events::payment_events());
    let orders = app::Orders::new(
        infra.pool.clone(),
        messaging.outbox().clone(),
        Duration::from_millis(config.saga_deadline_ms),
        sagas,
    );
    let messaging = messaging.start(handlers).await?;
    let sweeper = orders.clone();
    let api = grpc::OrderApi::new(orders);
    Ok(Server::bind(&SERVICE, &config.service, infra, messaging)
        .await?
        .add_service(api.into_server())
        .add_task(Box::new(move |shutdown| {
            Box::pin(sweeper.run_deadline_sweeper(shutdown))
        })))
}
