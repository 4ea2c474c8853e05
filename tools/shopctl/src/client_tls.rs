//! How `shopctl` reaches services that serve TLS: an `https://` endpoint,
//! the CA to trust, and a client certificate where they require one.

use std::path::PathBuf;

use anyhow::Context as _;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// TLS options for the gRPC endpoints.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientTls {
    /// PEM certificate of the CA that signed the services' certificate,
    /// trusted for `https://` endpoints.
    #[arg(long, env = "SHOP_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for services that require one (mTLS).
    #[arg(long, env = "SHOP_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "SHOP_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The name the services' certificate must carry, when it is not the
    /// endpoint's host.
    #[arg(long, env = "SHOP_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
}

impl ClientTls {
    /// The endpoint for `url`, with TLS when it is `https://`.
    pub fn endpoint(&self, url: &str) -> anyhow::Result<Endpoint> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .with_context(|| format!("{url} is not an endpoint URL"))?;
        if !url.starts_with("https://") {
            return Ok(endpoint);
        }
        let read = |path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))
        };
        let ca = self
            .tls_ca
            .as_ref()
            .context("an https:// endpoint needs --tls-ca (SHOP_TLS_CA), the CA that signed the services' certificate")?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(domain) = &self.tls_domain {
            tls = tls.domain_name(domain.clone());
        }
        endpoint
            .tls_config(tls)
            .context("configuring TLS for the gRPC endpoints")
    }
}
