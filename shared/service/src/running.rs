//! A server on a task of its own, for tests and `shopctl up`.

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

use crate::server::Server;

/// A server running on a task of its own; dropping the handle shuts it down.
#[derive(Debug)]
pub struct Running {
    grpc: SocketAddr,
    http: SocketAddr,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    /// Spawns `server.run` on the current runtime.
    pub fn spawn(server: Server) -> Self {
        Self::spawn_in(server, tracing::Span::none())
    }

    /// Spawns `server.run` inside `span`, so that its logs carry the span
    /// (a local stack prefixes each line with the service's name).
    pub fn spawn_in(server: Server, span: tracing::Span) -> Self {
        use tracing::Instrument as _;
        let (grpc, http) = (server.grpc_addr(), server.http_addr());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()).instrument(span));
        Self {
            grpc,
            http,
            shutdown,
            task: Some(task),
        }
    }

    /// The gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
    }

    /// The HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    /// A gRPC channel to the server.
    pub async fn channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        Ok(
            tonic::transport::Channel::from_shared(format!("http://{}", self.grpc))?
                .connect()
                .await?,
        )
    }

    /// Shuts the server down gracefully and returns how its run ended.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
