//! The provider port's HTTP adapter: JSON over HTTP/1.1 (TLS for
//! `https://`), the API key as a bearer token, an `Idempotency-Key` on every
//! call that changes anything, and a deadline on every call after which
//! the outcome is unknown.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use secrecy::{ExposeSecret as _, SecretString};

use super::{Outcome, PaymentProvider, ProviderPayment, ProviderRefund};

/// An answer larger than this is not one.
const MAX_BODY: usize = 256 * 1024;

/// A provider's API.
#[derive(Clone)]
pub(crate) struct HttpProvider {
    host: String,
    port: u16,
    authority: String,
    /// The URL's path, without a trailing slash.
    base: String,
    tls: Option<tokio_rustls::TlsConnector>,
    api_key: SecretString,
    timeout: Duration,
    currency: String,
}

impl std::fmt::Debug for HttpProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpProvider")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl HttpProvider {
    /// The API at `url`: `https://`, or plain `http://` on this machine's
    /// loopback only (the simulator), since the API key travels with every
    /// call.
    pub(crate) fn new(
        url: &str,
        api_key: SecretString,
        timeout: Duration,
        currency: &str,
    ) -> anyhow::Result<Self> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|error| anyhow::anyhow!("--provider-url {url}: {error}"))?;
        let host = uri
            .host()
            .ok_or_else(|| anyhow::anyhow!("--provider-url {url}: no host"))?
            .trim_matches(['[', ']'])
            .to_owned();
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") if is_loopback(&host) => false,
            _ => anyhow::bail!(
                "--provider-url {url}: the API key goes with every call, so https:// only \
                 (plain http:// only to this machine's loopback)"
            ),
        };
        if currency.len() != 3 {
            anyhow::bail!("--provider-currency {currency}: three letters");
        }
        let tls = if https {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        } else {
            None
        };
        Ok(Self {
            port: uri.port_u16().unwrap_or(if https { 443 } else { 80 }),
            authority: uri
                .authority()
                .map_or_else(|| host.clone(), |a| a.as_str().to_owned()),
            base: uri.path().trim_end_matches('/').to_owned(),
            host,
            tls,
            api_key,
            timeout,
            currency: currency.to_owned(),
        })
    }

    /// One call: its status and body, or why there is none within the
    /// deadline.
    async fn call(
        &self,
        method: hyper::Method,
        path: &str,
        key: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, bytes::Bytes), String> {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(hyper::header::HOST, &self.authority)
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.api_key.expose_secret()),
            )
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let body = body.map(|body| body.to_string()).unwrap_or_default();
        let request = request
            .body(Full::new(bytes::Bytes::from(body)))
            .map_err(|error| error.to_string())?;
        tokio::time::timeout(self.timeout, self.send(request))
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))?
    }

    async fn send(
        &self,
        request: hyper::Request<Full<bytes::Bytes>>,
    ) -> Result<(u16, bytes::Bytes), String> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|error| format!("connecting: {error}"))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|error| format!("bad host name: {error}"))?;
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|error| format!("TLS: {error}"))?;
                exchange(TokioIo::new(tls), request).await
            }
            None => exchange(TokioIo::new(tcp), request).await,
        }
    }

    /// Sorts an answer into the port's outcomes.
    fn outcome<T: serde::de::DeserializeOwned>(
        answer: Result<(u16, bytes::Bytes), String>,
    ) -> Outcome<T> {
        match answer {
            Err(why) => Outcome::Unknown(why),
            Ok((200..=299, body)) => match serde_json::from_slice(&body) {
                Ok(value) => Outcome::Done(value),
                // Answered, but not in a way this adapter reads: what was
                // done is not known.
                Err(error) => Outcome::Unknown(format!("unreadable answer: {error}")),
            },
            // The request itself refused: asking again will not help.
            Ok((status @ (400 | 402 | 422), body)) => {
                Outcome::Refused(format!("answered {status}: {}", text(&body)))
            }
            // Anything else says nothing of the request: the same key
            // still running (409), throttled, a server error, or the shop
            // misconfigured (a wrong key or URL: 401, 403, 404), which an
            // operator mends while the calls go on under the same key.
            Ok((status, body)) => Outcome::Unknown(format!("answered {status}: {}", text(&body))),
        }
    }
}

impl PaymentProvider for HttpProvider {
    async fn charge(
        &self,
        key: &str,
        amount_cents: i64,
        reference: &str,
    ) -> Outcome<ProviderPayment> {
        let body = serde_json::json!({
            "amount_cents": amount_cents,
            "currency": self.currency,
            "reference": reference,
        });
        Self::outcome(
            self.call(hyper::Method::POST, "/v1/payments", Some(key), Some(body))
                .await,
        )
    }

    async fn refund(&self, key: &str, payment_id: &str) -> Outcome<ProviderRefund> {
        let path = format!("/v1/payments/{payment_id}/refunds");
        Self::outcome(
            self.call(
                hyper::Method::POST,
                &path,
                Some(key),
                Some(serde_json::json!({})),
            )
            .await,
        )
    }
}

async fn exchange<I>(
    io: I,
    request: hyper::Request<Full<bytes::Bytes>>,
) -> Result<(u16, bytes::Bytes), String>
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
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|error| format!("reading the answer: {error}"))?
        .to_bytes();
    Ok((status, body))
}

/// An answer's body for a message, cut short.
fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned()
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
