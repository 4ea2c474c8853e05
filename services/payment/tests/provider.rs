//! The payment service with a payment provider: the service on free ports
//! against a fresh database and a real NATS server, and the provider
//! simulator serving its HTTP API and sending its signed webhooks to the
//! service's HTTP port. The events the service reacts to are published by
//! the test.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use async_nats::jetstream;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use pg_jetstream::envelope::publish_direct;
use pg_jetstream::{envelope::OutgoingEvent, provision::StreamSpec};
use shop_payment::provider::{ProviderConfig, ProviderKind};
use shop_proto::inventory::v1::InventoryReserved;
use shop_proto::order::v1::OrderCancelled;
use shop_proto::payment::v1::payment_service_client::PaymentServiceClient;
use shop_proto::payment::v1::{
    GetPaymentRequest, PaymentCompleted, PaymentFailed, PaymentRefunded, PaymentStatus,
};
use shop_provider_sim::{Faults, Simulator};
use shop_service::{Running, ServiceConfig};
use shop_test_support::TestInfra;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);
const API_KEY: &str = "sk_test_shop";
const SECRET: &str = "whsec_test_shop";

struct Shop {
    infra: TestInfra,
    js: jetstream::Context,
    client: PaymentServiceClient<shop_auth::BearerChannel>,
    simulator: std::sync::Arc<Simulator>,
    webhook_url: String,
    user_id: String,
    _stop: tokio_util::sync::DropGuard,
    _running: Running,
}

impl Shop {
    /// The service charging through the simulator with `faults`; webhooks
    /// sent to the service when `webhooks`; calls given up after
    /// `timeout_ms`.
    async fn start(faults: Faults, webhooks: bool, timeout_ms: u64) -> Self {
        let infra = TestInfra::start().await;
        let url = infra.postgres.create_database("shop_payment").await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = shop_payment::Config {
            service: ServiceConfig::local(url, infra.nats.url(), infra.issuer.auth_config()),
            starting_credit_cents: 0,
            provider: ProviderConfig {
                kind: ProviderKind::Http,
                provider_url: Some(format!("http://{}", listener.local_addr().unwrap())),
                provider_api_key: Some(API_KEY.into()),
                provider_webhook_secret: Some(SECRET.into()),
                provider_timeout_ms: timeout_ms,
                ..ProviderConfig::default()
            },
        };
        let js = jetstream::new(infra.nats.client().await);
        for (stream, prefix) in [
            ("USER", "user"),
            ("INVENTORY", "inventory"),
            ("ORDER", "order"),
        ] {
            StreamSpec::new(stream, prefix)
                .provision(&js)
                .await
                .unwrap();
        }
        let server = shop_payment::build(config).await.unwrap();
        let webhook_url = format!(
            "http://127.0.0.1:{}/webhooks/provider",
            server.http_addr().port()
        );
        let stop = CancellationToken::new();
        let simulator = Simulator::new(
            shop_provider_sim::Config {
                api_key: API_KEY.into(),
                webhook_url: webhooks.then(|| webhook_url.clone()),
                webhook_secret: SECRET.into(),
                seed: 1,
                faults,
            },
            stop.clone(),
        )
        .unwrap();
        let router = simulator.router();
        let stopped = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(stopped.cancelled_owned())
                .await
        });
        let running = Running::spawn(server);
        let client = PaymentServiceClient::new(shop_auth::with_token(
            running.channel().await.unwrap(),
            &infra.issuer.admin_token(),
        ));
        Self {
            infra,
            js,
            client,
            simulator,
            webhook_url,
            user_id: uuid::Uuid::now_v7().to_string(),
            _stop: stop.drop_guard(),
            _running: running,
        }
    }

    async fn reserved(&self, order_id: &str, total_cents: i64) {
        let event = InventoryReserved {
            order_id: order_id.into(),
            user_id: self.user_id.clone(),
            total_cents,
            lines: Vec::new(),
        };
        let event = OutgoingEvent::new(&event).correlated(order_id);
        publish_direct(&self.js, &event, "shop/inventory")
            .await
            .unwrap();
    }

    async fn cancelled(&self, order_id: &str) {
        let event = OrderCancelled {
            order_id: order_id.into(),
            user_id: self.user_id.clone(),
            reason: "timeout".into(),
        };
        let event = OutgoingEvent::new(&event).correlated(order_id);
        publish_direct(&self.js, &event, "shop/order")
            .await
            .unwrap();
    }

    /// The payment's status; none before the reservation is recorded.
    async fn status(&mut self, order_id: &str) -> Option<PaymentStatus> {
        let answer = self
            .client
            .get_payment(GetPaymentRequest {
                order_id: order_id.into(),
            })
            .await;
        match answer {
            Ok(answer) => Some(answer.into_inner().payment.unwrap().status()),
            Err(status) if status.code() == tonic::Code::NotFound => None,
            Err(status) => panic!("{status}"),
        }
    }

    async fn status_when(&mut self, order_id: &str, wanted: PaymentStatus) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let status = self.status(order_id).await;
            if status == Some(wanted) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the payment stayed {status:?}, not {wanted:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The last event the service published on `subject`, waited for,
    /// decoded.
    async fn last_event<M: prost::Message + Default>(&self, subject: &str) -> M {
        let message = self
            .infra
            .nats
            .last_message("PAYMENT", subject, WAIT)
            .await
            .unwrap();
        M::decode(message.payload.as_ref()).unwrap()
    }

    /// The events the service published, by subject.
    async fn published(&self) -> Vec<String> {
        let stream = self.js.get_stream("PAYMENT").await.unwrap();
        let last = stream.clone().info().await.unwrap().state.last_sequence;
        let mut subjects = Vec::new();
        for sequence in 1..=last {
            if let Ok(message) = stream.get_raw_message(sequence).await {
                subjects.push(message.subject.to_string());
            }
        }
        subjects
    }

    /// Waits until the simulator has delivered every webhook it means to.
    async fn webhooks_settled(&self) {
        tokio::time::sleep(Duration::from_millis(2000)).await;
    }

    /// The value of one sample of the service's `/metrics`, 0 if absent.
    async fn metric(&self, sample: &str) -> f64 {
        let uri: hyper::Uri = self.webhook_url.parse().unwrap();
        let tcp = tokio::net::TcpStream::connect(uri.authority().unwrap().as_str())
            .await
            .unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(connection);
        let request = hyper::Request::get("/metrics")
            .header("host", uri.authority().unwrap().as_str())
            .body(Full::new(bytes::Bytes::new()))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&body)
            .lines()
            .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// POSTs a webhook body with a signature header; the answer's status.
    async fn deliver(&self, signature: &str, body: &str) -> u16 {
        let uri: hyper::Uri = self.webhook_url.parse().unwrap();
        let tcp = tokio::net::TcpStream::connect(uri.authority().unwrap().as_str())
            .await
            .unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(connection);
        let request = hyper::Request::post(uri.path())
            .header("host", uri.authority().unwrap().as_str())
            .header("content-type", "application/json")
            .header("provider-signature", signature)
            .body(Full::new(bytes::Bytes::from(body.to_owned())))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        let _ = response.into_body().collect().await;
        status
    }
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

/// Webhooks duplicated, late, and first refused for a bad signature,
/// racing the call's own answer: one capture, one refund, one event each.
#[tokio::test(flavor = "multi_thread")]
async fn a_charge_is_captured_once_and_refunded_once_whatever_the_webhooks_do() {
    let faults = Faults {
        webhook_duplicate_rate: 1.0,
        webhook_bad_signature_rate: 1.0,
        webhook_delay_ms: 300,
        ..Faults::default()
    };
    let mut shop = Shop::start(faults, true, 2_000).await;
    let order_id = uuid::Uuid::now_v7().to_string();
    shop.reserved(&order_id, 1200).await;
    let completed: PaymentCompleted = shop.last_event("payment.completed").await;
    assert_eq!(completed.amount_cents, 1200);
    assert_eq!(shop.status(&order_id).await, Some(PaymentStatus::Captured));

    shop.cancelled(&order_id).await;
    let refunded: PaymentRefunded = shop.last_event("payment.refunded").await;
    assert_eq!(refunded.amount_cents, 1200);
    assert_eq!(shop.status(&order_id).await, Some(PaymentStatus::Refunded));

    shop.webhooks_settled().await;
    let payments = shop.simulator.payments();
    assert_eq!(payments.len(), 1, "{payments:?}");
    assert_eq!(payments[0].reference, order_id);
    assert_eq!(payments[0].refunded_cents, 1200);
    for call in ["charge", "refund"] {
        let sample = format!(r#"shop_provider_calls_total{{call="{call}",outcome="done"}}"#);
        assert_eq!(shop.metric(&sample).await, 1.0, "{sample}");
    }
    assert_eq!(
        shop.published().await,
        ["payment.completed", "payment.refunded"]
    );
}

/// The provider charges, then its answer never comes in time, and no
/// webhook tells: the payment stays PENDING until a call under the same
/// key learns the outcome, charged once. A decline is a failed payment.
#[tokio::test(flavor = "multi_thread")]
async fn an_answer_lost_after_the_charge_is_learnt_under_the_same_key() {
    let faults = Faults {
        timeout_after_charge_rate: 1.0,
        hang_ms: 3_000,
        decline_above_cents: Some(5_000),
        ..Faults::default()
    };
    let mut shop = Shop::start(faults, false, 300).await;
    let order_id = uuid::Uuid::now_v7().to_string();
    shop.reserved(&order_id, 1200).await;
    shop.status_when(&order_id, PaymentStatus::Captured).await;
    let payments = shop.simulator.payments();
    assert_eq!(payments.len(), 1, "{payments:?}");
    let unknown = shop
        .metric(r#"shop_provider_calls_total{call="charge",outcome="unknown"}"#)
        .await;
    assert!(unknown >= 1.0, "{unknown} charges counted unknown");
    let done = shop
        .metric(r#"shop_provider_calls_total{call="charge",outcome="done"}"#)
        .await;
    assert!(done >= 1.0, "{done} charges counted done");

    let declined = uuid::Uuid::now_v7().to_string();
    shop.reserved(&declined, 6000).await;
    let failed: PaymentFailed = shop.last_event("payment.failed").await;
    assert_eq!(failed.order_id, declined);
    assert_eq!(failed.reason, "insufficient funds at the payment provider");
    assert_eq!(shop.simulator.payments().len(), 2);
    assert_eq!(
        shop.published().await,
        ["payment.completed", "payment.failed"]
    );
}

/// The order is cancelled (its deadline passed) while the charge is still
/// on its way: the charge, once it succeeds, is refunded, and the order
/// never sees `payment.completed`.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancellation_while_the_charge_is_in_flight_refunds_the_charge() {
    let faults = Faults {
        latency_ms: 1_500,
        ..Faults::default()
    };
    let mut shop = Shop::start(faults, true, 5_000).await;
    let order_id = uuid::Uuid::now_v7().to_string();
    shop.reserved(&order_id, 700).await;
    shop.status_when(&order_id, PaymentStatus::Pending).await;
    shop.cancelled(&order_id).await;
    let _: PaymentRefunded = shop.last_event("payment.refunded").await;
    assert_eq!(shop.status(&order_id).await, Some(PaymentStatus::Refunded));
    shop.webhooks_settled().await;
    let payments = shop.simulator.payments();
    assert_eq!(payments.len(), 1, "{payments:?}");
    assert_eq!(payments[0].refunded_cents, 700);
    assert_eq!(shop.published().await, ["payment.refunded"]);
}

/// A webhook that is not the provider's (signed with another secret), or
/// is an old delivery replayed, is refused with 400 and settles nothing;
/// a genuine one for an order the shop does not know is taken and does
/// nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_forged_or_replayed_webhook_is_refused_and_settles_nothing() {
    let faults = Faults {
        latency_ms: 3_000,
        ..Faults::default()
    };
    let mut shop = Shop::start(faults, false, 10_000).await;
    let order_id = uuid::Uuid::now_v7().to_string();
    shop.reserved(&order_id, 900).await;
    shop.status_when(&order_id, PaymentStatus::Pending).await;
    let event = |reference: &str| {
        serde_json::json!({
            "id": format!("evt_{reference}"),
            "type": "payment.succeeded",
            "created": now(),
            "data": {"id": "pay_1", "status": "succeeded", "amount_cents": 900,
                     "reference": reference, "decline_code": "", "refunded_cents": 0},
        })
        .to_string()
    };
    let body = event(&order_id);
    let sign = shop_provider_sim::signature::sign;
    let forged = sign(b"not the secret", now(), body.as_bytes());
    assert_eq!(shop.deliver(&forged, &body).await, 400);
    let replayed = sign(SECRET.as_bytes(), now() - 3600, body.as_bytes());
    assert_eq!(shop.deliver(&replayed, &body).await, 400);
    assert_eq!(shop.deliver("", &body).await, 400);
    for reason in ["bad_signature", "stale", "unsigned"] {
        let sample = format!(r#"shop_provider_webhooks_refused_total{{reason="{reason}"}}"#);
        assert_eq!(shop.metric(&sample).await, 1.0, "{sample}");
    }
    assert_eq!(shop.status(&order_id).await, Some(PaymentStatus::Pending));

    // Genuine, but for another amount than the shop asked: not settled.
    let other = body.replace(r#""amount_cents":900"#, r#""amount_cents":1"#);
    assert_ne!(other, body);
    let genuine = sign(SECRET.as_bytes(), now(), other.as_bytes());
    assert_eq!(shop.deliver(&genuine, &other).await, 200);
    assert_eq!(shop.status(&order_id).await, Some(PaymentStatus::Pending));

    let stranger = event(&uuid::Uuid::now_v7().to_string());
    let genuine = sign(SECRET.as_bytes(), now(), stranger.as_bytes());
    assert_eq!(shop.deliver(&genuine, &stranger).await, 200);
    assert_eq!(shop.status(&order_id).await, Some(PaymentStatus::Pending));
    assert!(shop.published().await.is_empty());
}

/// The provider charges and holds its answer; its webhook comes first and
/// settles the payment while the call still waits; the answer, when it
/// comes, finds it settled.
#[tokio::test(flavor = "multi_thread")]
async fn a_webhook_before_the_answer_settles_the_payment_and_the_answer_changes_nothing() {
    let faults = Faults {
        timeout_after_charge_rate: 1.0,
        hang_ms: 2_000,
        ..Faults::default()
    };
    let mut shop = Shop::start(faults, true, 5_000).await;
    let order_id = uuid::Uuid::now_v7().to_string();
    shop.reserved(&order_id, 800).await;
    let completed: PaymentCompleted = shop.last_event("payment.completed").await;
    let trace = completed.provider.unwrap();
    assert_eq!(trace.settled_by, "webhook");
    assert_eq!(trace.payment_id, "pay_1");
    // The held answer comes (2 s after the charge) and settles nothing.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let done = shop
        .metric(r#"shop_provider_calls_total{call="charge",outcome="done"}"#)
        .await;
    assert_eq!(done, 1.0, "the call answered");
    assert_eq!(shop.status(&order_id).await, Some(PaymentStatus::Captured));
    assert_eq!(shop.published().await, ["payment.completed"]);
    assert_eq!(shop.simulator.payments().len(), 1);
}

/// The provider answers 503 for a while (nothing charged, nothing kept
/// under the key): the payment waits PENDING and is charged once the
/// provider is back.
#[tokio::test(flavor = "multi_thread")]
async fn a_provider_answering_503_is_called_again_until_it_charges() {
    let faults = Faults {
        error_rate: 1.0,
        ..Faults::default()
    };
    let mut shop = Shop::start(faults, false, 2_000).await;
    let order_id = uuid::Uuid::now_v7().to_string();
    shop.reserved(&order_id, 500).await;
    let sample = r#"shop_provider_calls_total{call="charge",outcome="unknown"}"#;
    let deadline = tokio::time::Instant::now() + WAIT;
    while shop.metric(sample).await < 2.0 {
        assert!(tokio::time::Instant::now() < deadline, "no calls counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(shop.status(&order_id).await, Some(PaymentStatus::Pending));
    assert!(shop.simulator.payments().is_empty());
    shop.simulator.set_faults(Faults::default()).unwrap();
    shop.status_when(&order_id, PaymentStatus::Captured).await;
    assert_eq!(shop.simulator.payments().len(), 1);
    assert_eq!(shop.published().await, ["payment.completed"]);
}

/// A refund whose answer is lost after the provider made it: called again
/// under the same refund key, which answers the first refund's outcome; the
/// provider refunded once.
#[tokio::test(flavor = "multi_thread")]
async fn a_refund_whose_answer_is_lost_is_made_once() {
    let faults = Faults {
        refund_timeout_rate: 1.0,
        hang_ms: 3_000,
        ..Faults::default()
    };
    let mut shop = Shop::start(faults, false, 300).await;
    let order_id = uuid::Uuid::now_v7().to_string();
    shop.reserved(&order_id, 600).await;
    shop.status_when(&order_id, PaymentStatus::Captured).await;
    shop.cancelled(&order_id).await;
    shop.status_when(&order_id, PaymentStatus::Refunded).await;
    let unknown = shop
        .metric(r#"shop_provider_calls_total{call="refund",outcome="unknown"}"#)
        .await;
    assert!(unknown >= 1.0, "{unknown} refunds counted unknown");
    let payments = shop.simulator.payments();
    assert_eq!(payments[0].refunded_cents, 600);
    assert_eq!(
        shop.published().await,
        ["payment.completed", "payment.refunded"]
    );
}
