//! The inventory service: the catalogue and the stock
//! (`shop.inventory.v1.InventoryService`), and its saga steps: the reservation, the sale and the release.
//!
//! - consumes `order.placed` (reserve all lines or none), `order.confirmed`
//!   (reserved becomes sold), `payment.failed` and `order.cancelled` (release);
//! - emits `inventory.reserved`, `inventory.rejected`, `inventory.released`.
//!
//! Modules: `domain` (the rules, pure: products, reserving in turn,
//! releasing, selling; public so that the saga model test drives them),
//! `app` (use cases and saga steps), `store` (every SQL statement), `events`
//! (the routing table), `grpc` (protobuf in and out), `schema`
//! (`migrations/inventory/`).

mod app;
pub mod domain;
mod events;
mod grpc;
mod schema;
mod store;

use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use shop_service::{Identity, Infrastructure, Ports, Server, ServiceConfig};

/// The inventory service: its name, its stream, its default ports.
pub const SERVICE: Identity = Identity {
    name: "inventory",
    stream: "INVENTORY",
    ports: Ports {
        grpc: 50053,
        http: 9103,
    },
};

/// The service's schema, from `migrations/inventory/`.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/inventory");

/// The inventory service's configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "inventory-svc", about = "The shop's inventory service")]
pub struct Config {
    /// What every service takes.
    #[command(flatten)]
    pub service: ServiceConfig,
}

/// Starts the inventory service's infrastructure and binds its servers.
pub async fn build(config: Config) -> anyhow::Result<Server> {
    let mut infra = Infrastructure::start(&config.service, &SERVICE, MIGRATIONS).await?;
    let messaging = infra
        .messaging()
        .consume("ORDER", events::order_events())
        .consume("PAYMENT", events::payment_events())
        .start(events::HandlerState)
        .await?;
    let api = grpc::InventoryApi::new(app::Catalogue::new(infra.pool.clone()));
    Ok(Server::bind(&SERVICE, &config.service, infra, messaging)
        .await?
        .add_service(api.into_server()))
}
