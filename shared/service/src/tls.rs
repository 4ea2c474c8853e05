//! TLS for the gRPC and HTTP servers, from PEM files (rustls with ring).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// How long a client may take over its TLS handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// The servers' certificate, and the CA that gRPC clients' certificates must
/// chain to (mTLS).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsConfig {
    /// PEM certificate chain the gRPC and HTTP servers present; with
    /// `--tls-key`, both serve TLS and nothing else.
    #[arg(long, env = "TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: every gRPC client must then present a
    /// certificate signed by one of them (mutual TLS). The HTTP port
    /// (probes, metrics) asks for none.
    #[arg(long, env = "TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

/// The loaded TLS settings of both servers.
#[derive(Clone)]
pub(crate) struct ServerTls {
    pub(crate) grpc: tonic::transport::ServerTlsConfig,
    pub(crate) http: Arc<rustls::ServerConfig>,
}

impl TlsConfig {
    /// The servers' TLS settings, or `None` when no certificate is given.
    pub(crate) fn server_tls(&self) -> anyhow::Result<Option<ServerTls>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let read = |path: &Path| {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))
        };
        let (cert_pem, key_pem) = (read(cert)?, read(key)?);
        let mut grpc = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&cert_pem, &key_pem))
            .timeout(HANDSHAKE);
        if let Some(ca) = &self.tls_client_ca {
            grpc = grpc.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("reading the certificates in {}", cert.display()))?;
        anyhow::ensure!(!chain.is_empty(), "{} holds no certificate", cert.display());
        let private = PrivateKeyDer::from_pem_slice(&key_pem)
            .with_context(|| format!("reading the private key in {}", key.display()))?;
        let mut http = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .context("the TLS certificate and key do not fit together")?;
        http.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(ServerTls {
            grpc,
            http: Arc::new(http),
        }))
    }
}

/// A listener that hands out TLS connections whose handshake is done; the
/// handshakes run on tasks of their own, so a slow client holds up no one.
pub(crate) struct TlsListener {
    accepted: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, std::net::SocketAddr)>,
    addr: std::net::SocketAddr,
}

impl TlsListener {
    pub(crate) fn new(
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
        shutdown: CancellationToken,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let (tx, accepted) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    () = shutdown.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            tracing::debug!(%error, "accepting an HTTP connection");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(error)) => tracing::debug!(%error, %peer, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { accepted, addr })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(accepted) => accepted,
            // Shut down: nothing more will come; the server stops on its
            // own shutdown signal meanwhile.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}
