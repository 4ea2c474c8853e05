//! `deploy/nats/nats.conf` on a real nats-server: every service works with
//! its own credentials; a service cannot publish another's events, read
//! another's deliveries or API replies through any inbox, or administer the
//! shared `DLQ` and `REPLAY` streams.

use shop_integration_tests::processes;
use std::collections::HashMap;
use std::time::Duration;

use processes::{ServiceProcess, place_order, settled};
use shop_proto::order::v1::order_service_client::OrderServiceClient;
use shop_proto::order::v1::{OrderItem, OrderStatus, PlaceOrderRequest};
use shop_proto::payment::v1::PaymentCompleted;
use shop_test_support::{TestNats, TestPostgres};

const SERVICES: [&str; 4] = ["user", "order", "inventory", "payment"];

fn password(user: &str) -> String {
    format!("secret-of-{user}")
}

async fn nats() -> TestNats {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats/nats.conf");
    let env: Vec<(String, String)> = SERVICES
        .iter()
        .chain(&["shopctl"])
        .map(|user| {
            (
                format!("NATS_PASSWORD_{}", user.to_uppercase()),
                password(user),
            )
        })
        .collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    TestNats::start_with_config(&file, &env, "shopctl", &password("shopctl")).await
}

async fn connect_as(nats: &TestNats, user: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .user_and_password(user.into(), password(user))
        .custom_inbox_prefix(format!("_INBOX_{user}"))
        .connect(nats.url())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_service_publishes_only_its_own_events_and_the_saga_still_runs() {
    let (nats, postgres) = tokio::join!(nats(), TestPostgres::start());
    // The operator's step: the services may not make the shared streams.
    let made = shopctl::nats::provision_shared(connect_as(&nats, "shopctl").await, 1)
        .await
        .unwrap();
    assert_eq!(made, ["DLQ", "REPLAY"]);
    let mut services = HashMap::new();
    for name in SERVICES {
        let url = postgres.create_database(&format!("shop_{name}")).await;
        let env = [
            ("NATS_USER", name.to_owned()),
            ("NATS_PASSWORD", password(name)),
            ("PROVISION_SHARED_STREAMS", "false".to_owned()),
        ];
        services.insert(
            name,
            ServiceProcess::start(name, &url, &nats.url(), &env).await,
        );
    }
    let channel = |name: &str| processes::admin_channel(services[name].endpoint());

    // A whole saga across the four, each on its own credentials.
    let user_id = processes::create_user(services["user"].endpoint(), "perm@example.com").await;
    processes::create_product(services["inventory"].endpoint(), "LAMP", 1999, 3).await;
    let mut orders = OrderServiceClient::new(channel("order"));
    let request = PlaceOrderRequest {
        user_id,
        items: vec![OrderItem {
            sku: "LAMP".into(),
            quantity: 1,
        }],
        idempotency_key: String::new(),
    };
    let order_id = place_order(&mut orders, tonic::Request::new(request))
        .await
        .order_id;
    let order = settled(&mut orders, &order_id).await;
    assert_eq!(order.status(), OrderStatus::Confirmed, "{order:?}");
    let admin = async_nats::jetstream::new(nats.client().await);
    let payments_before = nats.stored("PAYMENT").await;
    assert_eq!(payments_before, 1, "the saga's payment.completed");

    // The order service's credentials cannot forge a payment.
    let (errors_tx, mut errors) = tokio::sync::mpsc::unbounded_channel();
    let order_client = async_nats::ConnectOptions::new()
        .user_and_password("order".into(), password("order"))
        .custom_inbox_prefix("_INBOX_order")
        // A refused request is never answered: do not wait long for it.
        .request_timeout(Some(Duration::from_secs(1)))
        .event_callback(move |event| {
            let errors_tx = errors_tx.clone();
            async move {
                if let async_nats::Event::ServerError(error) = event {
                    let _ = errors_tx.send(error.to_string());
                }
            }
        })
        .connect(nats.url())
        .await
        .unwrap();
    let forged = prost::Message::encode_to_vec(&PaymentCompleted {
        order_id: order_id.clone(),
        user_id: "u".into(),
        amount_cents: 1,
        provider: None,
    });
    let js = async_nats::jetstream::new(order_client.clone());
    let published = match js.publish("payment.completed", forged.into()).await {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    assert!(
        !published,
        "JetStream acknowledged a forged payment.completed"
    );
    let error = tokio::time::timeout(Duration::from_secs(5), errors.recv())
        .await
        .expect("the server reports the violation")
        .unwrap();
    assert!(
        error.contains("Permissions Violation for Publish to \"payment.completed\""),
        "{error}"
    );
    // Nor read another service's events directly.
    let mut sneaking = order_client.subscribe("payment.>").await.unwrap();
    let error = tokio::time::timeout(Duration::from_secs(5), errors.recv())
        .await
        .expect("the server reports the violation")
        .unwrap();
    assert!(
        error.contains("Permissions Violation for Subscription to \"payment.>\""),
        "{error}"
    );
    assert!(
        tokio::time::timeout(
            Duration::from_millis(200),
            futures::StreamExt::next(&mut sneaking)
        )
        .await
        .map_or(true, |message| message.is_none())
    );
    let payments_after = nats.stored("PAYMENT").await;
    assert_eq!(payments_after, payments_before, "nothing forged was stored");

    // No inbox but its own: not the shared one, not another service's.
    for inbox in ["_INBOX.>", "_INBOX_payment.>", ">"] {
        let _denied = order_client.subscribe(inbox).await.unwrap();
        let error = tokio::time::timeout(Duration::from_secs(5), errors.recv())
            .await
            .expect("the server reports the violation")
            .unwrap();
        assert!(
            error.contains(&format!(
                "Permissions Violation for Subscription to \"{inbox}\""
            )),
            "{error}"
        );
    }

    // The dead letters are the operator's: a service may add its own but
    // not change, purge or delete the queue, nor the replays.
    admin
        .publish("dlq.order.order.placed", "kept".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let dlq_before = nats.stored("DLQ").await;
    let order_js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(1))
        .build(order_client.clone());
    for stream in ["DLQ", "REPLAY"] {
        let wiped = async_nats::jetstream::stream::Config {
            name: stream.to_owned(),
            subjects: vec![format!("{}.>", stream.to_lowercase())],
            max_messages: 1,
            ..Default::default()
        };
        assert!(
            order_js.update_stream(wiped).await.is_err(),
            "{stream} updated"
        );
        assert!(
            order_js.delete_stream(stream).await.is_err(),
            "{stream} deleted"
        );
        let purged = order_client
            .request(format!("$JS.API.STREAM.PURGE.{stream}"), "".into())
            .await;
        assert!(purged.is_err(), "{stream} purged: {purged:?}");
        let created = order_js
            .create_stream(async_nats::jetstream::stream::Config {
                name: format!("{stream}2"),
                subjects: vec!["dlq.order.x".into()],
                ..Default::default()
            })
            .await;
        assert!(created.is_err(), "a stream beside {stream} created");
    }
    // Nor replay to itself: replays come from the operator.
    let replay = order_js
        .publish("replay.order.payment.completed", "x".into())
        .await;
    let replayed = match replay {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    assert!(!replayed, "a service published a replay");
    assert_eq!(
        nats.stored("DLQ").await,
        dlq_before,
        "the dead letters are all there"
    );
    assert_eq!(
        admin
            .get_stream("DLQ")
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .config
            .max_messages,
        -1
    );

    // Its own subjects it may publish; a wrong password gets nowhere.
    let own = connect_as(&nats, "order").await;
    own.publish("order.note", "x".into()).await.unwrap();
    own.flush().await.unwrap();
    let wrong = async_nats::ConnectOptions::new()
        .user_and_password("order".into(), "guess".into())
        .connect(nats.url())
        .await;
    assert!(wrong.is_err(), "a wrong password connects");

    for process in services.values_mut() {
        assert!(process.terminate().await.success());
    }
}
