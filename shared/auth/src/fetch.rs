//! One HTTP(S) GET, for an identity provider's JWKS: hyper and rustls are in
//! the tree already (tonic, async-nats), so no HTTP client crate is added.
//!
//! The keys decide who may do anything, so they come over TLS: a plain
//! `http://` URL is refused unless it names this machine (loopback), or the
//! operator said `--allow-insecure-jwks-http`, in which case anyone on the
//! path can serve their own key and mint tokens.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

use crate::AuthError;

/// A key set larger than this is not one.
const MAX_BODY: usize = 1024 * 1024;
const TIMEOUT: Duration = Duration::from_secs(10);

/// A JWKS URL checked at start-up, with the TLS settings it is fetched with.
pub(crate) struct JwksUrl {
    url: String,
    host: String,
    port: u16,
    authority: String,
    path: String,
    /// `None` for a plain `http://` URL the rules above let through.
    tls: Option<tokio_rustls::TlsConnector>,
}

impl JwksUrl {
    /// Checks `url` against the rules above; `ca` (PEM) replaces the
    /// machine's trusted roots for an identity provider behind a private CA.
    pub(crate) fn new(url: &str, ca: Option<&Path>, allow_http: bool) -> Result<Self, AuthError> {
        let refused = |why: String| AuthError::Refused(format!("--jwks-url {url}: {why}"));
        let uri: hyper::Uri = url.parse().map_err(|error| refused(format!("{error}")))?;
        let host = uri
            .host()
            .ok_or_else(|| refused("the URL has no host".into()))?
            .trim_matches(['[', ']'])
            .to_owned();
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") if ca.is_some() => {
                return Err(refused("--jwks-ca needs an https:// URL".into()));
            }
            Some("http") if is_loopback(&host) => false,
            Some("http") if allow_http => {
                tracing::warn!(
                    url,
                    "fetching the trusted keys over plain HTTP (--allow-insecure-jwks-http): \
                     anyone on the path can serve a key of their own and sign any token"
                );
                false
            }
            Some("http") => {
                return Err(refused(
                    "keys are fetched over https:// only (plain http:// only from this \
                     machine's loopback, or with --allow-insecure-jwks-http)"
                        .into(),
                ));
            }
            _ => return Err(refused("the URL must start with https://".into())),
        };
        let tls = if https {
            Some(tls_connector(ca).map_err(refused)?)
        } else {
            None
        };
        Ok(Self {
            url: url.to_owned(),
            port: uri.port_u16().unwrap_or(if https { 443 } else { 80 }),
            authority: uri
                .authority()
                .map_or_else(|| host.clone(), |a| a.as_str().to_owned()),
            path: uri
                .path_and_query()
                .map_or("/", hyper::http::uri::PathAndQuery::as_str)
                .to_owned(),
            host,
            tls,
        })
    }

    /// The URL, for messages.
    pub(crate) fn as_str(&self) -> &str {
        &self.url
    }

    /// The body of the URL when it answers 200 within ten seconds.
    pub(crate) async fn get(&self) -> Result<Vec<u8>, String> {
        tokio::time::timeout(TIMEOUT, self.get_unbounded())
            .await
            .map_err(|_| format!("no answer within {TIMEOUT:?}"))?
    }

    async fn get_unbounded(&self) -> Result<Vec<u8>, String> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|error| format!("connecting: {error}"))?;
        let request = hyper::Request::get(self.path.as_str())
            .header(hyper::header::HOST, self.authority.as_str())
            .header(hyper::header::ACCEPT, "application/json")
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|error| error.to_string())?;
        match &self.tls {
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|error| format!("bad host name: {error}"))?;
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|error| format!("TLS: {error}"))?;
                send(TokioIo::new(tls), request).await
            }
            None => send(TokioIo::new(tcp), request).await,
        }
    }
}

/// `localhost`, or an address of the loopback interface.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

async fn send<I>(io: I, request: hyper::Request<Empty<bytes::Bytes>>) -> Result<Vec<u8>, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|error| format!("HTTP: {error}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let response = sender
        .send_request(request)
        .await
        .map_err(|error| format!("HTTP: {error}"))?;
    if response.status() != hyper::StatusCode::OK {
        return Err(format!("answered {}", response.status()));
    }
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|error| format!("reading the body: {error}"))?;
    Ok(body.to_bytes().to_vec())
}

/// Trusts the certificates in `ca` (PEM), or else the machine's roots.
fn tls_connector(ca: Option<&Path>) -> Result<tokio_rustls::TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|error| format!("reading --jwks-ca {}: {error}", path.display()))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|error| {
                    format!("reading the certificates in {}: {error}", path.display())
                })?;
                roots.add(cert).map_err(|error| {
                    format!("a certificate in {} is not usable: {error}", path.display())
                })?;
            }
            if roots.is_empty() {
                return Err(format!("{} holds no certificate", path.display()));
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err("no trusted root certificates on this machine (give --jwks-ca)".into());
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|error| error.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::{JwksUrl, is_loopback};
    use crate::AuthError;

    #[test]
    fn plain_http_only_to_loopback_or_when_allowed_loudly() {
        assert!(is_loopback("localhost") && is_loopback("127.0.0.2") && is_loopback("::1"));
        assert!(!is_loopback("idp.example") && !is_loopback("10.0.0.1"));
        for url in [
            "http://127.0.0.1:8080/certs",
            "http://localhost/certs",
            "http://[::1]/c",
        ] {
            assert!(JwksUrl::new(url, None, false).is_ok(), "{url}");
        }
        let refused =
            |url, allow| matches!(JwksUrl::new(url, None, allow), Err(AuthError::Refused(_)));
        assert!(refused("http://idp.example/certs", false));
        assert!(refused("http://10.0.0.1/certs", false));
        assert!(refused("ftp://idp.example/certs", true));
        assert!(refused("idp.example/certs", true));
        assert!(JwksUrl::new("http://idp.example/certs", None, true).is_ok());
    }
}
