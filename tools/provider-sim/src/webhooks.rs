//! Webhooks: every payment and refund is told to the merchant's endpoint
//! as a signed event, retried until the endpoint answers 2xx, late,
//! twice, out of order or badly signed when the faults say so.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::faults::{Dice, Faults};
use crate::signature;

/// One event, as its body says it.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// `evt_<n>`; the same in every delivery of the event.
    pub id: String,
    /// `payment.succeeded`, `payment.declined` or `refund.succeeded`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub created: i64,
    /// The payment or the refund.
    pub data: serde_json::Value,
}

/// Deliveries, counted.
#[derive(Debug, Default, Serialize)]
pub struct Counts {
    /// Events made.
    pub events: AtomicU64,
    /// HTTP requests sent to the endpoint.
    pub attempts: AtomicU64,
    /// Deliveries the endpoint took (2xx).
    pub delivered: AtomicU64,
    /// Deliveries it refused (4xx), bad signatures included.
    pub refused: AtomicU64,
    /// Events given up after every retry.
    pub abandoned: AtomicU64,
}

/// Where webhooks go and what signs them.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub(crate) url: hyper::Uri,
    pub(crate) secret: Vec<u8>,
}

/// How many times one delivery is tried: about two minutes of retries.
const ATTEMPTS: u32 = 30;

/// Sends `event` to `endpoint` in a task of its own, as `faults` say.
pub(crate) fn send(
    endpoint: &Arc<Endpoint>,
    event: Event,
    faults: &Faults,
    dice: &Dice,
    counts: &Arc<Counts>,
    shutdown: &CancellationToken,
) {
    counts.events.fetch_add(1, Ordering::Relaxed);
    let copies = if dice.roll(faults.webhook_duplicate_rate) {
        2
    } else {
        1
    };
    let body = Arc::new(serde_json::to_vec(&event).unwrap_or_default());
    for _ in 0..copies {
        let delivery = Delivery {
            endpoint: Arc::clone(endpoint),
            body: Arc::clone(&body),
            delay: Duration::from_millis(dice.up_to(faults.webhook_delay_ms)),
            bad_signature: dice.roll(faults.webhook_bad_signature_rate),
            old_timestamp: dice.roll(faults.webhook_old_timestamp_rate),
            counts: Arc::clone(counts),
        };
        let shutdown = shutdown.clone();
        let id = event.id.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = delivery.run(&id) => {}
            }
        });
    }
}

struct Delivery {
    endpoint: Arc<Endpoint>,
    body: Arc<Vec<u8>>,
    delay: Duration,
    bad_signature: bool,
    old_timestamp: bool,
    counts: Arc<Counts>,
}

impl Delivery {
    async fn run(self, id: &str) {
        tokio::time::sleep(self.delay).await;
        let mut wait = Duration::from_millis(100);
        for attempt in 0..ATTEMPTS {
            let now = unix_now();
            // Only the first attempt carries the injected fault; the
            // retries are what a provider sends after a refusal.
            let timestamp = if attempt == 0 && self.old_timestamp {
                now - 3600
            } else {
                now
            };
            let secret: &[u8] = if attempt == 0 && self.bad_signature {
                b"not the endpoint's secret"
            } else {
                &self.endpoint.secret
            };
            let header = signature::sign(secret, timestamp, &self.body);
            self.counts.attempts.fetch_add(1, Ordering::Relaxed);
            match post(&self.endpoint.url, &header, &self.body).await {
                Ok(status) if (200..300).contains(&status) => {
                    self.counts.delivered.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Ok(status) => {
                    if (400..500).contains(&status) {
                        self.counts.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::debug!(event = id, status, attempt, "webhook not taken; retrying");
                }
                Err(error) => {
                    tracing::debug!(event = id, %error, attempt, "webhook not delivered; retrying");
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
        self.counts.abandoned.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(event = id, "webhook abandoned after {ATTEMPTS} attempts");
    }
}

/// POSTs `body` to `url` (plain HTTP) and returns the status.
async fn post(url: &hyper::Uri, signature: &str, body: &[u8]) -> Result<u16, String> {
    let host = url.host().ok_or("the webhook URL has no host")?;
    let port = url.port_u16().unwrap_or(80);
    let request = hyper::Request::post(url.path_and_query().map_or("/", |p| p.as_str()))
        .header(
            hyper::header::HOST,
            url.authority().map_or(host, |a| a.as_str()),
        )
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(signature::HEADER, signature)
        .body(Full::new(bytes::Bytes::copy_from_slice(body)))
        .map_err(|error| error.to_string())?;
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|error| format!("connecting: {error}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|error| error.to_string())?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let response = sender
            .send_request(request)
            .await
            .map_err(|error| error.to_string())?;
        let status = response.status().as_u16();
        let _ = response.into_body().collect().await;
        Ok(status)
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "no answer within 5 s".to_owned())?
}

/// Seconds since the epoch.
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
