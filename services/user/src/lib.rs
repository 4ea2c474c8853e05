//! The user service: registers customers (`shop.user.v1.UserService`) and
//! publishes `user.created`, which the order and payment services consume.
//! It consumes nothing.
//!
//! - `domain`: validated email and name.
//! - `app`: the use cases, each one transaction (with its outbox event).
//! - `store`: every SQL statement.
//! - `grpc`: the gRPC adapter (protobuf in and out).
//! - `schema`: the diesel view of `migrations/user/`.

mod app;
mod domain;
mod grpc;
mod schema;
mod store;

use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use shop_service::{Identity, Infrastructure, Ports, Server, ServiceConfig};

/// The user service: its name, its stream, its default ports.
pub const SERVICE: Identity = Identity {
    name: "user",
    stream: "USER",
    ports: Ports {
        grpc: 50051,
        http: 9101,
    },
};

/// The service's schema, from `migrations/user/`.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/user");

/// The user service's configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "user-svc", about = "The shop's user service")]
pub struct Config {
    /// What every service takes.
    #[command(flatten)]
    pub service: ServiceConfig,
}

/// Starts the user service's infrastructure and binds its servers; `run`
/// the result to serve.
pub async fn build(config: Config) -> anyhow::Result<Server> {
    let mut infra = Infrastructure::start(&config.service, &SERVICE, MIGRATIONS).await?;
    // It consumes nothing: the runtime is its outbox and relay.
    let messaging = infra.messaging::<()>();
    let api = grpc::UserApi::new(app::Users::new(
        infra.pool.clone(),
        messaging.outbox().clone(),
    ));
    let messaging = messaging.start(()).await?;
    Ok(Server::bind(&SERVICE, &config.service, infra, messaging)
        .await?
        .add_service(api.into_server()))
}
