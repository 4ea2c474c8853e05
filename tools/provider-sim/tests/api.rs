//! The simulator as a process, over HTTP: what its API promises, each
//! fault, and the webhooks it signs.

#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt as _;

const KEY: &str = "sk_test_simulator";
const SECRET: &str = "whsec_test_simulator";

/// The simulator's process, killed when dropped.
struct Sim {
    address: String,
    _child: tokio::process::Child,
}

impl Sim {
    async fn start(faults: Value, webhook_url: Option<&str>) -> Self {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_provider-sim"));
        command
            .args(["--listen", "127.0.0.1:0", "--faults", &faults.to_string()])
            .env("PROVIDER_API_KEY", KEY)
            .env("PROVIDER_WEBHOOK_SECRET", SECRET)
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        if let Some(url) = webhook_url {
            command.args(["--webhook-url", url]);
        }
        let mut child = command.spawn().unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let address = line
            .strip_prefix("provider-sim listening on http://")
            .unwrap()
            .to_owned();
        Self {
            address,
            _child: child,
        }
    }

    /// One request; (status, whether replayed, body).
    async fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Result<(u16, bool, Value), String> {
        self.call_as(KEY, method, path, key, body).await
    }

    async fn call_as(
        &self,
        api_key: &str,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Result<(u16, bool, Value), String> {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.address)
            .header("authorization", format!("Bearer {api_key}"))
            .header("content-type", "application/json");
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = request.body(Full::new(bytes::Bytes::from(body))).unwrap();
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect(&self.address).await.unwrap();
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(connection);
            let response = sender.send_request(request).await.unwrap();
            let status = response.status().as_u16();
            let replayed = response.headers().contains_key("idempotent-replayed");
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            (status, replayed, body)
        };
        tokio::time::timeout(Duration::from_secs(2), exchange)
            .await
            .map_err(|_| "timed out".to_owned())
    }

    async fn ledger(&self) -> Value {
        self.call("GET", "/_sim/ledger", None, None)
            .await
            .unwrap()
            .2
    }
}

fn charge(amount: i64, reference: &str) -> Option<Value> {
    Some(json!({"amount_cents": amount, "currency": "EUR", "reference": reference}))
}

#[tokio::test]
async fn a_key_charges_once_and_answers_the_same_again() {
    let sim = Sim::start(json!({}), None).await;
    let (status, replayed, first) = sim
        .call("POST", "/v1/payments", Some("order-1"), charge(500, "o1"))
        .await
        .unwrap();
    assert_eq!((status, replayed), (200, false));
    assert_eq!(first["status"], "succeeded");
    let (status, replayed, again) = sim
        .call("POST", "/v1/payments", Some("order-1"), charge(500, "o1"))
        .await
        .unwrap();
    assert_eq!((status, replayed), (200, true));
    assert_eq!(again, first);
    // The same key with another amount is a client's bug.
    let (status, _, body) = sim
        .call("POST", "/v1/payments", Some("order-1"), charge(501, "o1"))
        .await
        .unwrap();
    assert_eq!(status, 400);
    assert_eq!(body["error"]["type"], "idempotency_error");
    // Without a key, or with a bad request, nothing is charged.
    let (status, _, _) = sim
        .call("POST", "/v1/payments", None, charge(500, "o2"))
        .await
        .unwrap();
    assert_eq!(status, 400);
    let (status, _, _) = sim
        .call("POST", "/v1/payments", Some("order-2"), charge(0, "o2"))
        .await
        .unwrap();
    assert_eq!(status, 400);
    // Retrieval by id and by reference.
    let id = first["id"].as_str().unwrap();
    let (status, _, found) = sim
        .call("GET", &format!("/v1/payments/{id}"), None, None)
        .await
        .unwrap();
    assert_eq!((status, found), (200, first.clone()));
    let (_, _, list) = sim
        .call("GET", "/v1/payments?reference=o1", None, None)
        .await
        .unwrap();
    assert_eq!(list["data"], json!([first]));
    let (status, _, _) = sim
        .call("GET", "/v1/payments/pay_99", None, None)
        .await
        .unwrap();
    assert_eq!(status, 404);
    assert_eq!(sim.ledger().await["payments"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_wrong_api_key_is_refused_and_charges_nothing() {
    let sim = Sim::start(json!({}), None).await;
    let (status, _, body) = sim
        .call_as(
            "sk_wrong",
            "POST",
            "/v1/payments",
            Some("k"),
            charge(5, "o"),
        )
        .await
        .unwrap();
    assert_eq!(status, 401);
    assert_eq!(body["error"]["type"], "authentication_error");
    assert_eq!(sim.ledger().await["payments"], json!([]));
}

#[tokio::test]
async fn refunds_happen_once_per_key_and_never_past_the_charge() {
    let sim = Sim::start(json!({}), None).await;
    let (_, _, payment) = sim
        .call("POST", "/v1/payments", Some("order-1"), charge(500, "o1"))
        .await
        .unwrap();
    let path = format!("/v1/payments/{}/refunds", payment["id"].as_str().unwrap());
    let (status, _, refund) = sim
        .call("POST", &path, Some("refund-1"), Some(json!({})))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(refund["amount_cents"], 500);
    assert_eq!(refund["reference"], "o1");
    let (status, replayed, again) = sim
        .call("POST", &path, Some("refund-1"), Some(json!({})))
        .await
        .unwrap();
    assert_eq!((status, replayed, again), (200, true, refund));
    // A new key finds nothing left to refund.
    let (status, _, body) = sim
        .call(
            "POST",
            &path,
            Some("refund-2"),
            Some(json!({"amount_cents": 1})),
        )
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    let ledger = sim.ledger().await;
    assert_eq!(ledger["payments"][0]["refunded_cents"], 500);
    assert_eq!(ledger["refunds"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn faults_decline_fail_and_time_out_after_charging() {
    let sim = Sim::start(json!({"decline_above_cents": 1000}), None).await;
    let (_, _, declined) = sim
        .call("POST", "/v1/payments", Some("big"), charge(1001, "big"))
        .await
        .unwrap();
    assert_eq!(declined["status"], "declined");
    assert_eq!(declined["decline_code"], "insufficient_funds");

    // A 503 before anything: nothing charged, the key still free.
    let set = |faults: Value| sim.call("PUT", "/_sim/faults", None, Some(faults));
    assert_eq!(set(json!({"error_rate": 1.0})).await.unwrap().0, 200);
    let (status, _, _) = sim
        .call("POST", "/v1/payments", Some("order-1"), charge(5, "o1"))
        .await
        .unwrap();
    assert_eq!(status, 503);
    assert_eq!(sim.ledger().await["payments"].as_array().unwrap().len(), 1);

    // Charged, but the answer never comes in time: the retry under the
    // same key learns the outcome, and the charge was made once.
    set(json!({"timeout_after_charge_rate": 1.0, "hang_ms": 5000}))
        .await
        .unwrap();
    let outcome = sim
        .call("POST", "/v1/payments", Some("order-1"), charge(5, "o1"))
        .await;
    assert_eq!(outcome.unwrap_err(), "timed out");
    set(json!({})).await.unwrap();
    let (status, replayed, payment) = sim
        .call("POST", "/v1/payments", Some("order-1"), charge(5, "o1"))
        .await
        .unwrap();
    assert_eq!((status, replayed), (200, true));
    assert_eq!(payment["status"], "succeeded");
    let payments = sim.ledger().await["payments"].clone();
    assert_eq!(payments.as_array().unwrap().len(), 2);

    // Rates outside 0..1 are refused.
    assert_eq!(set(json!({"decline_rate": 2.0})).await.unwrap().0, 400);
}

/// Webhooks as a receiver sees them: signed over the timestamp and the
/// body; a duplicate, a bad signature and an old timestamp when the
/// faults say so, each retried until the receiver takes it.
#[tokio::test]
async fn webhooks_come_signed_and_are_retried_until_taken() {
    let received: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let seen = Arc::clone(&received);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let seen = Arc::clone(&seen);
            async move {
                let signature = headers
                    .get("provider-signature")
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_owned();
                seen.lock().unwrap().push((signature.clone(), body.clone()));
                let timestamp: i64 = signature
                    .strip_prefix("t=")
                    .and_then(|rest| rest.split(',').next())
                    .unwrap()
                    .parse()
                    .unwrap();
                let fresh = (now() - timestamp).abs() < 300;
                let expected = shop_provider_sim::signature::sign(
                    SECRET.as_bytes(),
                    timestamp,
                    body.as_bytes(),
                );
                if fresh && signature == expected {
                    axum::http::StatusCode::OK
                } else {
                    axum::http::StatusCode::BAD_REQUEST
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let sim = Sim::start(
        json!({
            "webhook_duplicate_rate": 1.0,
            "webhook_bad_signature_rate": 1.0,
            "webhook_old_timestamp_rate": 1.0,
        }),
        Some(&url),
    )
    .await;
    sim.call("POST", "/v1/payments", Some("order-1"), charge(5, "o1"))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let counts = loop {
        let counts = sim.ledger().await["webhooks"].clone();
        if counts["delivered"] == 2 || tokio::time::Instant::now() > deadline {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Two copies, each refused once (bad signature and old timestamp on
    // its first attempt) and taken on the second.
    assert_eq!(counts["events"], 1, "{counts}");
    assert_eq!(counts["delivered"], 2, "{counts}");
    assert_eq!(counts["refused"], 2, "{counts}");
    let received = received.lock().unwrap().clone();
    assert_eq!(received.len(), 4);
    let event: Value = serde_json::from_str(&received[0].1).unwrap();
    assert_eq!(event["type"], "payment.succeeded");
    assert_eq!(event["data"]["reference"], "o1");
    assert!(received.iter().all(|(_, body)| *body == received[0].1));
}

fn now() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}
