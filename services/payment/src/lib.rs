//! The payment service: one wallet per user (`shop.payment.v1.PaymentService`),
//! and its saga steps: a wallet for each new user, the payment and the refund.
//!
//! - consumes `user.created` (open the wallet), `inventory.reserved` (debit),
//!   `order.cancelled` (refund a capture);
//! - emits `payment.completed`, `payment.failed`, `payment.refunded`.
//!
//! Modules: `domain` (the rules, pure: deposits, charging in turn, refunds;
//! public so that the saga model test drives them), `app` (use cases and
//! saga steps), `store` (every SQL statement), `events` (the routing
//! table), `grpc` (protobuf in and out), `schema` (`migrations/payment/`).

mod app;
pub mod domain;
mod events;
mod grpc;
pub mod provider;
mod schema;
mod store;

use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use shop_service::{Identity, Infrastructure, Ports, Server, ServiceConfig};

/// The payment service: its name, its stream, its default ports.
pub const SERVICE: Identity = Identity {
    name: "payment",
    stream: "PAYMENT",
    ports: Ports {
        grpc: 50054,
        http: 9104,
    },
};

/// The service's schema, from `migrations/payment/`.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/payment");

/// The payment service's configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "payment-svc", about = "The shop's payment service")]
pub struct Config {
    /// What every service takes.
    #[command(flatten)]
    pub service: ServiceConfig,
    /// The credit a new user's wallet opens with, in cents: 0 unless a demo
    /// asks for more, since anyone the identity provider vouches for may
    /// register and spend it.
    #[arg(long, env = "STARTING_CREDIT_CENTS", default_value_t = 0)]
    pub starting_credit_cents: i64,
    /// How payments are taken.
    #[command(flatten)]
    pub provider: provider::ProviderConfig,
}

/// Starts the payment service's infrastructure and binds its servers.
pub async fn build(config: Config) -> anyhow::Result<Server> {
    let mut infra = Infrastructure::start(&config.service, &SERVICE, MIGRATIONS).await?;
    let metrics = provider::metrics::ProviderMetrics::default();
    infra.register_metrics(|registry| metrics.register(registry));
    let messaging = infra.messaging();
    let steps = match config.provider.kind {
        provider::ProviderKind::Wallet => None,
        provider::ProviderKind::Http => Some(std::sync::Arc::new(provider_steps(
            &config,
            &infra,
            messaging.outbox(),
            metrics,
        )?)),
    };
    let by_provider = steps.is_some();
    let handlers = events::HandlerState {
        starting_credit: config.starting_credit_cents,
        provider: steps.clone(),
    };
    let messaging = messaging
        .consume("USER", events::user_events())
        .consume("INVENTORY", events::inventory_events(by_provider))
        .consume("ORDER", events::order_events())
        .start(handlers)
        .await?;
    let api = grpc::PaymentApi::new(app::Wallets::new(infra.pool.clone()));
    let mut server = Server::bind(&SERVICE, &config.service, infra, messaging).await?;
    if let (Some(steps), Some(secret)) = (steps, config.provider.provider_webhook_secret.clone()) {
        server = server
            .add_http_routes(provider::webhook::routes(
                std::sync::Arc::clone(&steps),
                secret,
            ))
            .add_task(Box::new(move |shutdown| Box::pin(steps.run(shutdown))));
    }
    Ok(server.add_service(api.into_server()))
}

/// The provider's steps, from `--payment-provider http` and its settings.
fn provider_steps(
    config: &Config,
    infra: &Infrastructure,
    outbox: &pg_jetstream::Outbox,
    metrics: provider::metrics::ProviderMetrics,
) -> anyhow::Result<provider::steps::Steps<provider::http::HttpProvider>> {
    let settings = &config.provider;
    let (Some(url), Some(key), Some(_)) = (
        settings.provider_url.as_deref(),
        settings.provider_api_key.clone(),
        settings.provider_webhook_secret.as_ref(),
    ) else {
        anyhow::bail!(
            "--payment-provider http needs --provider-url, --provider-api-key and --provider-webhook-secret"
        );
    };
    let timeout = std::time::Duration::from_millis(settings.provider_timeout_ms);
    let http = provider::http::HttpProvider::new(url, key, timeout, &settings.provider_currency)?;
    Ok(provider::steps::Steps::new(
        infra.pool.clone(),
        outbox.clone(),
        http,
        timeout,
        metrics,
    ))
}
