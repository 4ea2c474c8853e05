//! A payment provider on this machine, for the payment service's provider
//! adapter: the small API the well-known providers share, a ledger of what
//! it charged and refunded, signed webhooks, and faults to inject.
//!
//! - `POST /v1/payments` (`Idempotency-Key` required) charges
//!   `{amount_cents, currency, reference}`; `GET /v1/payments/{id}` and
//!   `GET /v1/payments?reference=...` retrieve;
//!   `POST /v1/payments/{id}/refunds` (`Idempotency-Key` required) refunds
//!   `{amount_cents}` (the rest of the payment when left out).
//! - A key used again with the same parameters answers what it answered
//!   the first time (`Idempotent-Replayed: true`) without a second effect;
//!   with other parameters it is refused (400, `idempotency_error`); while
//!   its first request runs, 409.
//! - Every call needs `Authorization: Bearer <api key>` (401 otherwise).
//! - Each payment and refund is sent as a webhook event to the endpoint
//!   given, signed as [`signature`] says, retried until taken.
//! - `GET /_sim/ledger` shows the books and the webhook counts;
//!   `GET`/`PUT /_sim/faults` read and set the [`Faults`];
//!   `PUT /_sim/webhook` with `{"url": ...}` moves the webhooks.

mod faults;
mod ledger;
pub mod signature;
mod webhooks;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

pub use faults::Faults;
pub use ledger::{Payment, Refund};
pub use webhooks::{Counts, Event};

use faults::Dice;
use ledger::{Begin, Ledger};
use webhooks::{Endpoint, unix_now};

/// What the simulator is started with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The key callers must present.
    pub api_key: String,
    /// Where webhooks go (plain `http://`), if anywhere.
    pub webhook_url: Option<String>,
    /// What signs them.
    pub webhook_secret: String,
    /// Seeds the dice that decide when a fault strikes.
    pub seed: u64,
    pub faults: Faults,
}

/// The simulator's state; [`Simulator::router`] serves it.
#[derive(Debug)]
pub struct Simulator {
    api_key: String,
    endpoint: Mutex<Option<Arc<Endpoint>>>,
    webhook_secret: String,
    faults: Mutex<Faults>,
    dice: Dice,
    ledger: Mutex<Ledger>,
    counts: Arc<Counts>,
    shutdown: CancellationToken,
}

impl Simulator {
    /// Checks `config`; `shutdown` ends held answers and pending webhooks.
    pub fn new(config: Config, shutdown: CancellationToken) -> Result<Arc<Self>, String> {
        config.faults.check()?;
        if config.api_key.is_empty() {
            return Err("the API key must not be empty".into());
        }
        let endpoint = endpoint(config.webhook_url.as_deref(), &config.webhook_secret)?;
        Ok(Arc::new(Self {
            api_key: config.api_key,
            endpoint: Mutex::new(endpoint),
            webhook_secret: config.webhook_secret,
            faults: Mutex::new(config.faults),
            dice: Dice::new(config.seed),
            ledger: Mutex::new(Ledger::default()),
            counts: Arc::new(Counts::default()),
            shutdown,
        }))
    }

    /// The HTTP API.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route("/v1/payments", post(create_payment).get(find_payments))
            .route("/v1/payments/{id}", get(payment))
            .route("/v1/payments/{id}/refunds", post(create_refund))
            .route("/_sim/ledger", get(ledger))
            .route("/_sim/faults", get(faults).put(set_faults))
            .route("/_sim/webhook", axum::routing::put(set_webhook))
            .with_state(Arc::clone(self))
    }

    /// Sends the webhooks from now on to `url` (none: to nowhere).
    pub fn set_webhook_url(&self, url: Option<&str>) -> Result<(), String> {
        *lock(&self.endpoint) = endpoint(url, &self.webhook_secret)?;
        Ok(())
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        lock(&self.faults).clone()
    }

    /// Replaces the faults.
    pub fn set_faults(&self, faults: Faults) -> Result<(), String> {
        faults.check()?;
        *lock(&self.faults) = faults;
        Ok(())
    }

    /// Every payment made so far.
    pub fn payments(&self) -> Vec<Payment> {
        lock(&self.ledger).payments.clone()
    }

    fn authorized(&self, headers: &HeaderMap) -> Result<(), Failure> {
        let presented = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or_default();
        if same(presented.as_bytes(), self.api_key.as_bytes()) {
            Ok(())
        } else {
            Err(error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "give the API key as `Authorization: Bearer <key>`",
            ))
        }
    }

    /// The injected latency, then whether to fail with a 503 first.
    async fn before_call(&self) -> Result<Faults, Failure> {
        let faults = self.faults();
        if faults.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
        }
        if self.dice.roll(faults.error_rate) {
            return Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "the provider is having trouble; retry with the same key",
            ));
        }
        Ok(faults)
    }

    /// Holds an answer for `hang_ms` (or until shutdown).
    async fn hang(&self, faults: &Faults) {
        tokio::select! {
            () = self.shutdown.cancelled() => {}
            () = tokio::time::sleep(Duration::from_millis(faults.hang_ms)) => {}
        }
    }

    fn tell(&self, kind: &'static str, data: serde_json::Value, faults: &Faults) {
        let Some(endpoint) = lock(&self.endpoint).clone() else {
            return;
        };
        let n = self
            .counts
            .events
            .load(std::sync::atomic::Ordering::Relaxed)
            + 1;
        let event = Event {
            id: format!("evt_{n}"),
            kind,
            created: unix_now(),
            data,
        };
        webhooks::send(
            &endpoint,
            event,
            faults,
            &self.dice,
            &self.counts,
            &self.shutdown,
        );
    }
}

/// Where webhooks go, checked: plain `http://host:port/path`, with a
/// secret to sign them.
fn endpoint(url: Option<&str>, secret: &str) -> Result<Option<Arc<Endpoint>>, String> {
    let Some(url) = url else {
        return Ok(None);
    };
    let uri: hyper::Uri = url
        .parse()
        .map_err(|error| format!("webhook URL {url}: {error}"))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(format!("webhook URL {url}: give http://host:port/path"));
    }
    if secret.is_empty() {
        return Err("webhooks need a secret to sign them".into());
    }
    Ok(Some(Arc::new(Endpoint {
        url: uri,
        secret: secret.as_bytes().to_vec(),
    })))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a call ends without doing what it asked: an error, or the answer a
/// key gave before.
#[derive(Debug)]
enum Failure {
    Error(StatusCode, &'static str, String),
    Replay(serde_json::Value),
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        match self {
            Self::Error(status, kind, message) => (
                status,
                Json(serde_json::json!({"error": {"type": kind, "message": message}})),
            )
                .into_response(),
            Self::Replay(body) => ([("idempotent-replayed", "true")], Json(body)).into_response(),
        }
    }
}

fn error(status: StatusCode, kind: &'static str, message: &str) -> Failure {
    Failure::Error(status, kind, message.to_owned())
}

type Answer = Result<Response, Failure>;

fn idempotency_key(headers: &HeaderMap) -> Result<String, Failure> {
    headers
        .get("idempotency-key")
        .and_then(|value| value.to_str().ok())
        .filter(|key| !key.is_empty() && key.len() <= 255)
        .map(str::to_owned)
        .ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "an Idempotency-Key header (1 to 255 characters) is required",
            )
        })
}

/// Answers a key's earlier request, or says why it cannot.
fn begin(simulator: &Simulator, scope: &str, fingerprint: &str) -> Result<(), Failure> {
    match lock(&simulator.ledger).begin(scope, fingerprint) {
        Begin::New => Ok(()),
        Begin::Replay(body) => Err(Failure::Replay(body)),
        Begin::Mismatch => Err(error(
            StatusCode::BAD_REQUEST,
            "idempotency_error",
            "this Idempotency-Key was used with other parameters",
        )),
        Begin::Running => Err(error(
            StatusCode::CONFLICT,
            "idempotency_error",
            "a request with this Idempotency-Key is still running; retry later",
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreatePayment {
    amount_cents: i64,
    currency: String,
    reference: String,
}

async fn create_payment(
    State(simulator): State<Arc<Simulator>>,
    headers: HeaderMap,
    Json(request): Json<CreatePayment>,
) -> Answer {
    simulator.authorized(&headers)?;
    let key = idempotency_key(&headers)?;
    if request.amount_cents < 1 || request.reference.is_empty() || request.currency.len() != 3 {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "amount_cents must be positive, currency three letters, reference not empty",
        ));
    }
    let faults = simulator.before_call().await?;
    let scope = format!("payments {key}");
    let fingerprint = format!(
        "{} {} {}",
        request.amount_cents, request.currency, request.reference
    );
    begin(&simulator, &scope, &fingerprint)?;
    let decline_code = if faults
        .decline_above_cents
        .is_some_and(|limit| request.amount_cents > limit)
    {
        "insufficient_funds"
    } else if simulator.dice.roll(faults.decline_rate) {
        "card_declined"
    } else {
        ""
    };
    let payment = {
        let mut ledger = lock(&simulator.ledger);
        let payment = Payment {
            id: format!("pay_{}", ledger.payments.len() + 1),
            status: if decline_code.is_empty() {
                "succeeded"
            } else {
                "declined"
            }
            .into(),
            amount_cents: request.amount_cents,
            currency: request.currency,
            reference: request.reference,
            decline_code: decline_code.into(),
            refunded_cents: 0,
            created: unix_now(),
        };
        ledger.payments.push(payment.clone());
        let body = serde_json::to_value(&payment).unwrap_or_default();
        ledger.answer(&scope, body);
        payment
    };
    tracing::info!(payment = %payment.id, reference = %payment.reference, status = %payment.status, "payment");
    let kind = if decline_code.is_empty() {
        "payment.succeeded"
    } else {
        "payment.declined"
    };
    simulator.tell(
        kind,
        serde_json::to_value(&payment).unwrap_or_default(),
        &faults,
    );
    if simulator.dice.roll(faults.timeout_after_charge_rate) {
        simulator.hang(&faults).await;
    }
    Ok(Json(payment).into_response())
}

async fn payment(
    State(simulator): State<Arc<Simulator>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Answer {
    simulator.authorized(&headers)?;
    simulator.before_call().await?;
    match lock(&simulator.ledger).payment_mut(&id) {
        Some(payment) => Ok(Json(payment.clone()).into_response()),
        None => Err(error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "no such payment",
        )),
    }
}

async fn find_payments(
    State(simulator): State<Arc<Simulator>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Answer {
    simulator.authorized(&headers)?;
    let reference = query.as_deref().and_then(|query| {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix("reference="))
    });
    let Some(reference) = reference.filter(|r| !r.is_empty()) else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "give ?reference=...",
        ));
    };
    simulator.before_call().await?;
    let found: Vec<Payment> = lock(&simulator.ledger)
        .payments
        .iter()
        .filter(|payment| payment.reference == reference)
        .cloned()
        .collect();
    Ok(Json(serde_json::json!({ "data": found })).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRefund {
    amount_cents: Option<i64>,
}

async fn create_refund(
    State(simulator): State<Arc<Simulator>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(request): Json<CreateRefund>,
) -> Answer {
    simulator.authorized(&headers)?;
    let key = idempotency_key(&headers)?;
    let faults = simulator.before_call().await?;
    let scope = format!("refunds {key}");
    let fingerprint = format!("{id} {:?}", request.amount_cents);
    begin(&simulator, &scope, &fingerprint)?;
    let refund = {
        let mut ledger = lock(&simulator.ledger);
        let refusal = match ledger.payment_mut(&id) {
            None => Err((StatusCode::NOT_FOUND, "no such payment")),
            Some(payment) if payment.status != "succeeded" => Err((
                StatusCode::BAD_REQUEST,
                "only a succeeded payment can be refunded",
            )),
            Some(payment) => {
                let left = payment.amount_cents - payment.refunded_cents;
                let amount = request.amount_cents.unwrap_or(left);
                if amount < 1 || amount > left {
                    Err((
                        StatusCode::BAD_REQUEST,
                        "the amount is more than is left to refund",
                    ))
                } else {
                    payment.refunded_cents += amount;
                    Ok((amount, payment.reference.clone()))
                }
            }
        };
        match refusal {
            Err((status, message)) => {
                ledger.forget(&scope);
                return Err(error(status, "invalid_request_error", message));
            }
            Ok((amount_cents, reference)) => {
                let refund = Refund {
                    id: format!("re_{}", ledger.refunds.len() + 1),
                    payment_id: id,
                    reference,
                    amount_cents,
                    status: "succeeded".into(),
                    created: unix_now(),
                };
                ledger.refunds.push(refund.clone());
                ledger.answer(&scope, serde_json::to_value(&refund).unwrap_or_default());
                refund
            }
        }
    };
    tracing::info!(refund = %refund.id, payment = %refund.payment_id, amount = refund.amount_cents, "refund");
    simulator.tell(
        "refund.succeeded",
        serde_json::to_value(&refund).unwrap_or_default(),
        &faults,
    );
    if simulator.dice.roll(faults.refund_timeout_rate) {
        simulator.hang(&faults).await;
    }
    Ok(Json(refund).into_response())
}

async fn ledger(State(simulator): State<Arc<Simulator>>, headers: HeaderMap) -> Answer {
    simulator.authorized(&headers)?;
    let ledger = lock(&simulator.ledger);
    Ok(Json(serde_json::json!({
        "payments": ledger.payments,
        "refunds": ledger.refunds,
        "webhooks": *simulator.counts,
    }))
    .into_response())
}

async fn faults(State(simulator): State<Arc<Simulator>>, headers: HeaderMap) -> Answer {
    simulator.authorized(&headers)?;
    Ok(Json(simulator.faults()).into_response())
}

async fn set_faults(
    State(simulator): State<Arc<Simulator>>,
    headers: HeaderMap,
    Json(faults): Json<Faults>,
) -> Answer {
    simulator.authorized(&headers)?;
    match simulator.set_faults(faults) {
        Ok(()) => Ok(Json(simulator.faults()).into_response()),
        Err(message) => Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &message,
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetWebhook {
    url: Option<String>,
}

async fn set_webhook(
    State(simulator): State<Arc<Simulator>>,
    headers: HeaderMap,
    Json(request): Json<SetWebhook>,
) -> Answer {
    simulator.authorized(&headers)?;
    simulator
        .set_webhook_url(request.url.as_deref())
        .map_err(|message| error(StatusCode::BAD_REQUEST, "invalid_request_error", &message))?;
    Ok(Json(serde_json::json!({ "url": request.url })).into_response())
}
