//! The provider's webhooks: `POST /webhooks/provider` on the service's HTTP
//! port. A delivery is taken only when its `Provider-Signature` is the
//! HMAC-SHA256, under the webhook secret, of `<t>.<body>` and `t` is
//! within five minutes of now (an old delivery replayed is refused); an
//! event already applied is acknowledged without effect. What it reports
//! settles the payment exactly as the call's answer would have, whichever
//! comes first.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use secrecy::{ExposeSecret as _, SecretString};

use super::steps::{SettleError, Steps, Webhook};
use super::{PaymentProvider, ProviderPayment, ProviderRefund};

/// How far a delivery's timestamp may be from now.
pub(crate) const REPLAY_WINDOW: Duration = Duration::from_secs(300);

/// The route, for the service's HTTP server.
pub(crate) fn routes<P: PaymentProvider>(
    steps: Arc<Steps<P>>,
    secret: SecretString,
) -> axum::Router {
    axum::Router::new()
        .route("/webhooks/provider", axum::routing::post(receive::<P>))
        .with_state(Arc::new(Receiver { steps, secret }))
}

struct Receiver<P> {
    steps: Arc<Steps<P>>,
    secret: SecretString,
}

/// Why a delivery was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No signature header, or one that does not parse.
    Unsigned,
    /// Signed with another secret, or the body was changed.
    BadSignature,
    /// Signed too long ago (or in the future): a replay.
    Stale,
}

impl Refusal {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Unsigned => "unsigned",
            Self::BadSignature => "bad_signature",
            Self::Stale => "stale",
        }
    }
}

/// Checks `header` (`t=<unix seconds>,v1=<hex>[,v1=<hex>...]`) against
/// `body` at `now` (unix seconds).
pub(crate) fn verify(secret: &[u8], header: &str, body: &[u8], now: i64) -> Result<(), Refusal> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => timestamp = value.parse::<i64>().ok(),
            Some(("v1", value)) => signatures.push(value),
            _ => {}
        }
    }
    let Some(timestamp) = timestamp else {
        return Err(Refusal::Unsigned);
    };
    if signatures.is_empty() {
        return Err(Refusal::Unsigned);
    }
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut signed = Vec::with_capacity(body.len() + 12);
    signed.extend_from_slice(timestamp.to_string().as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(body);
    let genuine = signatures.iter().any(|hex| {
        decode_hex(hex).is_some_and(|tag| ring::hmac::verify(&key, &signed, &tag).is_ok())
    });
    if !genuine {
        return Err(Refusal::BadSignature);
    }
    let window = i64::try_from(REPLAY_WINDOW.as_secs()).unwrap_or(i64::MAX);
    // `abs_diff`: a timestamp at an integer extreme is stale, not a panic.
    if now.abs_diff(timestamp) > window.unsigned_abs() {
        return Err(Refusal::Stale);
    }
    Ok(())
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

#[derive(Debug, serde::Deserialize)]
struct Event {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    data: serde_json::Value,
}

async fn receive<P: PaymentProvider>(
    State(receiver): State<Arc<Receiver<P>>>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> (StatusCode, String) {
    let header = headers
        .get("provider-signature")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let now = chrono::Utc::now().timestamp();
    if let Err(refusal) = verify(
        receiver.secret.expose_secret().as_bytes(),
        header,
        &body,
        now,
    ) {
        tracing::warn!(reason = refusal.as_str(), "webhook refused");
        receiver.steps.metrics().webhook_refused(refusal.as_str());
        return (
            StatusCode::BAD_REQUEST,
            format!("refused: {}", refusal.as_str()),
        );
    }
    receiver.steps.metrics().webhook_taken();
    let event: Event = match serde_json::from_slice(&body) {
        Ok(event) => event,
        Err(error) => return (StatusCode::BAD_REQUEST, format!("not an event: {error}")),
    };
    let webhook = Some(Webhook {
        event_id: &event.id,
        kind: &event.kind,
    });
    let applied = match event.kind.as_str() {
        "payment.succeeded" | "payment.declined" => {
            match serde_json::from_value::<ProviderPayment>(event.data) {
                Ok(payment) => receiver.steps.settle_charge(&payment, webhook).await,
                Err(error) => return (StatusCode::BAD_REQUEST, format!("not a payment: {error}")),
            }
        }
        "refund.succeeded" => match serde_json::from_value::<ProviderRefund>(event.data) {
            Ok(refund) => match refund.reference.parse() {
                Ok(order_id) => receiver.steps.settle_refund(order_id, webhook).await,
                Err(_) => Err(SettleError::Reference(refund.reference)),
            },
            Err(error) => return (StatusCode::BAD_REQUEST, format!("not a refund: {error}")),
        },
        // Events this shop does not act on are taken, so that the provider
        // stops sending them.
        _ => Ok(()),
    };
    match applied {
        Ok(()) => (StatusCode::OK, "ok".into()),
        Err(SettleError::Reference(reference)) => (
            StatusCode::BAD_REQUEST,
            format!("the reference {reference:?} is no order id"),
        ),
        // Not recorded: the provider delivers it again.
        Err(error) => {
            tracing::warn!(event = %event.id, %error, "webhook not applied; the provider retries");
            (StatusCode::SERVICE_UNAVAILABLE, "try again".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Refusal, verify};

    /// The value of Python's `hmac.new(b"whsec_test",
    /// b'1700000000.{"id":"evt_1"}', hashlib.sha256).hexdigest()`.
    const SIGNED: &str =
        "t=1700000000,v1=c89214b5b5da833daed6f0b8c5bb6bd58cea9022bd80ccc78230f3942d632925";
    const BODY: &[u8] = br#"{"id":"evt_1"}"#;

    #[test]
    fn a_delivery_is_taken_only_signed_right_and_recent() {
        let secret = b"whsec_test";
        assert_eq!(verify(secret, SIGNED, BODY, 1_700_000_100), Ok(()));
        // Several signatures (a secret being rolled): one is enough.
        let rolled = format!("t=1700000000,v1=00,{}", &SIGNED[13..]);
        assert_eq!(verify(secret, &rolled, BODY, 1_700_000_000), Ok(()));
        assert_eq!(
            verify(b"another secret", SIGNED, BODY, 1_700_000_000),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            verify(secret, SIGNED, br#"{"id":"evt_2"}"#, 1_700_000_000),
            Err(Refusal::BadSignature)
        );
        // A timestamp moved is a signature broken.
        let moved = SIGNED.replace("t=1700000000", "t=1700000100");
        assert_eq!(
            verify(secret, &moved, BODY, 1_700_000_100),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            verify(secret, SIGNED, BODY, 1_700_000_301),
            Err(Refusal::Stale)
        );
        assert_eq!(
            verify(secret, SIGNED, BODY, 1_699_999_699),
            Err(Refusal::Stale)
        );
        assert_eq!(
            verify(secret, "", BODY, 1_700_000_000),
            Err(Refusal::Unsigned)
        );
        assert_eq!(
            verify(secret, "t=1700000000", BODY, 1_700_000_000),
            Err(Refusal::Unsigned)
        );
    }
}
