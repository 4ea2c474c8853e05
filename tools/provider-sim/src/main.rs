//! `provider-sim`: the payment provider simulator as a process.
//!
//! ```text
//! PROVIDER_API_KEY=sk_test PROVIDER_WEBHOOK_SECRET=whsec_test \
//!   provider-sim --listen 127.0.0.1:8099 \
//!   --webhook-url http://127.0.0.1:9104/webhooks/provider \
//!   --faults '{"decline_rate": 0.1, "timeout_after_charge_rate": 0.05}'
//! ```
//!
//! Prints `provider-sim listening on http://<address>` once it listens.

#![allow(clippy::print_stdout)] // says where it listens

use clap::Parser as _;
use shop_provider_sim::{Config, Faults, Simulator};
use tokio_util::sync::CancellationToken;

#[derive(Debug, clap::Parser)]
#[command(
    name = "provider-sim",
    about = "A payment provider simulator with faults"
)]
struct Args {
    /// Where to listen (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:8099")]
    listen: std::net::SocketAddr,
    /// The key callers present as `Authorization: Bearer <key>`.
    #[arg(long, env = "PROVIDER_API_KEY", hide_env_values = true)]
    api_key: String,
    /// Where to send webhooks (plain http://).
    #[arg(long, env = "PROVIDER_WEBHOOK_URL")]
    webhook_url: Option<String>,
    /// The secret webhooks are signed with.
    #[arg(
        long,
        env = "PROVIDER_WEBHOOK_SECRET",
        hide_env_values = true,
        default_value = ""
    )]
    webhook_secret: String,
    /// The faults, as JSON (see `GET /_sim/faults` for every field).
    #[arg(long, default_value = "{}")]
    faults: String,
    /// Seeds when the faults strike.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let faults: Faults =
        serde_json::from_str(&args.faults).map_err(|error| anyhow::anyhow!("--faults: {error}"))?;
    let shutdown = CancellationToken::new();
    let simulator = Simulator::new(
        Config {
            api_key: args.api_key,
            webhook_url: args.webhook_url,
            webhook_secret: args.webhook_secret,
            seed: args.seed,
            faults,
        },
        shutdown.clone(),
    )
    .map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!(
        "provider-sim listening on http://{}",
        listener.local_addr()?
    );
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    axum::serve(listener, simulator.router())
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}
