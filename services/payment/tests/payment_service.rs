//! The payment service alone, on free ports against a fresh database and a
//! real NATS server; the events it reacts to are published by the test.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use async_nats::jetstream;
use pg_jetstream::envelope::publish_direct;
use pg_jetstream::{envelope::OutgoingEvent, provision::StreamSpec};
use prost::Message as _;
use shop_proto::inventory::v1::InventoryReserved;
use shop_proto::order::v1::OrderCancelled;
use shop_proto::payment::v1::payment_service_client::PaymentServiceClient;
use shop_proto::payment::v1::{
    DepositRequest, GetAccountRequest, GetPaymentRequest, PaymentCompleted, PaymentFailed,
    PaymentRefunded, PaymentStatus,
};
use shop_proto::user::v1::UserCreated;
use shop_service::{Running, ServiceConfig};
use shop_test_support::TestInfra;

const WAIT: Duration = Duration::from_secs(20);

struct Payments {
    infra: TestInfra,
    js: jetstream::Context,
    client: PaymentServiceClient<shop_auth::BearerChannel>,
    user_id: String,
    _running: Running,
}

impl Payments {
    /// The service with a starting credit of 5,000 cents and one user's wallet.
    async fn start() -> Self {
        let infra = TestInfra::start().await;
        let url = infra.postgres.create_database("shop_payment").await;
        let config = shop_payment::Config {
            service: ServiceConfig::local(url, infra.nats.url(), infra.issuer.auth_config()),
            starting_credit_cents: 5000,
            provider: Default::default(),
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
        let running = Running::spawn(shop_payment::build(config).await.unwrap());
        let client = PaymentServiceClient::new(shop_auth::with_token(
            running.channel().await.unwrap(),
            &infra.issuer.admin_token(),
        ));
        let mut payments = Self {
            infra,
            js,
            client,
            user_id: uuid::Uuid::now_v7().to_string(),
            _running: running,
        };
        let created = UserCreated {
            user_id: payments.user_id.clone(),
            email: "ann@example.com".into(),
            ..Default::default()
        };
        payments
            .publish(OutgoingEvent::new(&created), "shop/user")
            .await;
        payments.balance_when(|balance| balance == Some(5000)).await;
        payments
    }

    async fn publish(&self, event: OutgoingEvent, source: &str) {
        publish_direct(&self.js, &event, source).await.unwrap();
    }

    async fn balance(&mut self) -> Option<i64> {
        let request = GetAccountRequest {
            user_id: self.user_id.clone(),
        };
        self.client
            .get_account(request)
            .await
            .ok()
            .map(|r| r.into_inner().account.unwrap().balance_cents)
    }

    async fn balance_when(&mut self, check: impl Fn(Option<i64>) -> bool) -> Option<i64> {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let balance = self.balance().await;
            if check(balance) {
                return balance;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the balance never got there: {balance:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn reserved(&self, order_id: &str, total_cents: i64) {
        let event = InventoryReserved {
            order_id: order_id.into(),
            user_id: self.user_id.clone(),
            total_cents,
            lines: Vec::new(),
        };
        self.publish(
            OutgoingEvent::new(&event).correlated(order_id),
            "shop/inventory",
        )
        .await;
    }

    async fn cancelled(&self, order_id: &str) {
        let event = OrderCancelled {
            order_id: order_id.into(),
            user_id: self.user_id.clone(),
            reason: "timeout".into(),
        };
        self.publish(
            OutgoingEvent::new(&event).correlated(order_id),
            "shop/order",
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reserved_order_is_captured_then_refunded_when_cancelled() {
    let mut payments = Payments::start().await;
    let order_id = uuid::Uuid::now_v7().to_string();
    payments.reserved(&order_id, 1200).await;
    let message = payments
        .infra
        .nats
        .last_message("PAYMENT", "payment.completed", WAIT)
        .await
        .unwrap();
    assert_eq!(
        PaymentCompleted::decode(message.payload.as_ref())
            .unwrap()
            .amount_cents,
        1200
    );
    assert_eq!(payments.balance().await, Some(3800));

    payments.cancelled(&order_id).await;
    let message = payments
        .infra
        .nats
        .last_message("PAYMENT", "payment.refunded", WAIT)
        .await
        .unwrap();
    assert_eq!(
        PaymentRefunded::decode(message.payload.as_ref())
            .unwrap()
            .amount_cents,
        1200
    );
    assert_eq!(payments.balance().await, Some(5000));
    let payment = payments
        .client
        .get_payment(GetPaymentRequest { order_id })
        .await
        .unwrap()
        .into_inner()
        .payment
        .unwrap();
    assert_eq!(payment.status(), PaymentStatus::Refunded);
}

#[tokio::test(flavor = "multi_thread")]
async fn too_little_money_fails_the_payment_and_debits_nothing() {
    let mut payments = Payments::start().await;
    let order_id = uuid::Uuid::now_v7().to_string();
    payments.reserved(&order_id, 5001).await;
    let message = payments
        .infra
        .nats
        .last_message("PAYMENT", "payment.failed", WAIT)
        .await
        .unwrap();
    let failed = PaymentFailed::decode(message.payload.as_ref()).unwrap();
    assert_eq!(
        failed.reason,
        "insufficient funds: balance 5000 cents, order 5001 cents"
    );
    assert_eq!(payments.balance().await, Some(5000));

    // A deposit, repeated with the same key, credits once.
    for _ in 0..2 {
        let request = DepositRequest {
            user_id: payments.user_id.clone(),
            amount_cents: 10,
            idempotency_key: "tip".into(),
        };
        assert_eq!(
            payments
                .client
                .deposit(request)
                .await
                .unwrap()
                .into_inner()
                .account
                .unwrap()
                .balance_cents,
            5010
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancellation_that_overtakes_the_reservation_prevents_the_debit() {
    let mut payments = Payments::start().await;
    let order_id = uuid::Uuid::now_v7().to_string();
    payments.cancelled(&order_id).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    payments.reserved(&order_id, 1000).await;
    // A later order is captured, so the late reservation has been handled.
    let later = uuid::Uuid::now_v7().to_string();
    payments.reserved(&later, 100).await;
    payments.balance_when(|balance| balance == Some(4900)).await;
    let message = payments
        .infra
        .nats
        .last_message("PAYMENT", "payment.completed", WAIT)
        .await
        .unwrap();
    assert_eq!(
        PaymentCompleted::decode(message.payload.as_ref())
            .unwrap()
            .order_id,
        later
    );
    let status = payments
        .client
        .get_payment(GetPaymentRequest { order_id })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
}
