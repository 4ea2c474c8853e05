//! `shopctl probe`: whether a service reports SERVING on `grpc.health.v1`,
//! as an exit status, for container health checks.

use std::time::Duration;

use anyhow::Context as _;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Options of `shopctl probe`.
#[derive(Debug, clap::Args)]
pub(crate) struct Probe {
    /// The service's gRPC endpoint.
    #[arg(long, default_value = "http://localhost:50051")]
    grpc: String,
    /// The service name to ask about; empty asks about the server as a whole.
    #[arg(long, default_value = "")]
    service: String,
    /// How long to wait for an answer, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// TLS, for an `https://` endpoint.
    #[command(flatten)]
    tls: shopctl::client_tls::ClientTls,
}

impl Probe {
    pub(crate) async fn run(self) -> anyhow::Result<()> {
        let timeout = Duration::from_millis(self.timeout_ms);
        let channel = self
            .tls
            .endpoint(&self.grpc)?
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect()
            .await
            .with_context(|| format!("cannot reach {}", self.grpc))?;
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: self.service.clone(),
            })
            .await
            .with_context(|| format!("{} answered the health check with an error", self.grpc))?
            .into_inner()
            .status();
        anyhow::ensure!(
            status == ServingStatus::Serving,
            "{} is {}",
            self.grpc,
            status.as_str_name()
        );
        println!("{} is SERVING", self.grpc);
        Ok(())
    }
}
