//! One saga is one trace: the four services run as separate processes from
//! their real binaries, each exporting spans over OTLP to a collector in
//! this test (a tonic server of the OTLP trace service), as each would to
//! Jaeger.

use shop_integration_tests::{collector, processes};
use std::collections::HashMap;

use collector::{Collector, Span};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use processes::{ProviderProcess, ServiceProcess, free_port, http_get, place_order, settled};
use shop_proto::inventory::v1::CreateProductRequest;
use shop_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use shop_proto::order::v1::order_service_client::OrderServiceClient;
use shop_proto::order::v1::{OrderItem, OrderStatus, PlaceOrderRequest};
use shop_proto::user::v1::CreateUserRequest;
use shop_proto::user::v1::user_service_client::UserServiceClient;
use shop_test_support::TestInfra;

/// Every consumer span's parent is the producer span that published its
/// event (same message id) in the same trace.
fn assert_consumers_follow_their_producers(spans: &[Span]) {
    let by_id: HashMap<&str, &Span> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    for consumer in spans.iter().filter(|s| s.kind == SpanKind::Consumer as i32) {
        let parent = by_id
            .get(consumer.parent_span_id.as_str())
            .unwrap_or_else(|| panic!("the parent of {consumer:?} is not in the trace"));
        assert_eq!(parent.kind, SpanKind::Producer as i32, "{consumer:?}");
        assert_eq!(
            parent.attributes.get("messaging.message.id"),
            consumer.attributes.get("messaging.message.id"),
            "{consumer:?} under {parent:?}"
        );
        assert_eq!(consumer.attributes["messaging.system"], "nats");
        assert!(!consumer.attributes["order_id"].is_empty() || consumer.name.starts_with("user."));
    }
}

fn with_traceparent<T>(message: T, trace_id: &str, span_id: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{span_id}-01").parse().unwrap(),
    );
    request
}

/// The four services, each on a database of its own, exporting their spans
/// to the collector on `otlp_port` every 100 ms (instead of every 5 s),
/// with `extra(name)` added to their environment.
async fn start_services(
    infra: &TestInfra,
    otlp_port: u16,
    extra: impl Fn(&str) -> Vec<(&'static str, String)>,
) -> HashMap<&'static str, ServiceProcess> {
    let mut services = HashMap::new();
    for name in ["user", "order", "inventory", "payment"] {
        let url = infra
            .postgres
            .create_database(&format!("shop_{name}"))
            .await;
        let mut env = vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{otlp_port}"),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ];
        env.extend(extra(name));
        let process = ServiceProcess::start(name, &url, &infra.nats.url(), &env).await;
        services.insert(name, process);
    }
    services
}

#[tokio::test(flavor = "multi_thread")]
async fn a_saga_is_one_trace_across_the_services_it_touches() {
    let (collector, otlp_port, server) = Collector::start(free_port());

    let infra = TestInfra::start().await;
    let mut services = start_services(&infra, otlp_port, |_| Vec::new()).await;
    let channel = |name: &str| processes::admin_channel(services[name].endpoint());
    let mut users = UserServiceClient::new(channel("user"));
    let mut orders = OrderServiceClient::new(channel("order"));
    let mut inventory = InventoryServiceClient::new(channel("inventory"));

    // CreateUser continues the caller's trace into order and payment.
    let user_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let user_id = users
        .create_user(with_traceparent(
            CreateUserRequest {
                email: "otto@example.com".into(),
                name: "Otto".into(),
            },
            user_trace,
            "00f067aa0ba902b7",
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
        .user_id;
    for (sku, price) in [("LAMP", 1999), ("YACHT", 50_000_000)] {
        inventory
            .create_product(CreateProductRequest {
                sku: sku.into(),
                name: sku.into(),
                price_cents: price,
                stock: 5,
            })
            .await
            .unwrap();
    }
    let spans = collector
        .wait_for(
            user_trace,
            &[("order", "user.created"), ("payment", "user.created")],
        )
        .await;
    let root = spans
        .iter()
        .find(|s| s.name == "shop.user.v1.UserService/CreateUser")
        .unwrap();
    assert_eq!(root.service, "user");
    assert_eq!(root.kind, SpanKind::Server as i32);
    assert_eq!(root.parent_span_id, "00f067aa0ba902b7", "the caller's span");
    assert_consumers_follow_their_producers(&spans);

    // A confirmed saga and a compensated one (payment declined).
    let confirmed_trace = "0af7651916cd43dd8448eb211c80319c";
    let declined_trace = "a3ce929d0e0e47364bf92f3577b34da6";
    let mut placed = Vec::new();
    for (trace, sku) in [(confirmed_trace, "LAMP"), (declined_trace, "YACHT")] {
        let request = PlaceOrderRequest {
            user_id: user_id.clone(),
            items: vec![OrderItem {
                sku: sku.into(),
                quantity: 1,
            }],
            idempotency_key: sku.into(),
        };
        let order = place_order(
            &mut orders,
            with_traceparent(request, trace, "b7ad6b7169203331"),
        )
        .await;
        placed.push(order.order_id);
    }
    for (order_id, expected) in placed
        .iter()
        .zip([OrderStatus::Confirmed, OrderStatus::Cancelled])
    {
        assert_eq!(settled(&mut orders, order_id).await.status(), expected);
    }

    let spans = collector
        .wait_for(
            confirmed_trace,
            &[
                ("inventory", "order.placed"),
                ("payment", "inventory.reserved"),
                ("order", "inventory.reserved"),
                ("order", "payment.completed"),
                ("inventory", "order.confirmed"),
            ],
        )
        .await;
    assert_consumers_follow_their_producers(&spans);
    let root = spans
        .iter()
        .find(|s| s.name == "shop.order.v1.OrderService/PlaceOrder")
        .unwrap();
    assert_eq!(root.parent_span_id, "b7ad6b7169203331");
    assert_eq!(root.attributes["order_id"], placed[0]);
    assert!(
        spans
            .iter()
            .any(|s| s.service == "order" && s.name == "outbox write"),
        "the outbox write has a span"
    );
    assert!(
        spans
            .iter()
            .filter(|s| s.kind == SpanKind::Consumer as i32)
            .all(|s| s.attributes["order_id"] == placed[0]),
        "every consumer span names the order"
    );

    let spans = collector
        .wait_for(
            declined_trace,
            &[
                ("inventory", "order.placed"),
                ("payment", "inventory.reserved"),
                ("order", "payment.failed"),
                ("inventory", "payment.failed"),
                ("inventory", "order.cancelled"),
                ("payment", "order.cancelled"),
            ],
        )
        .await;
    assert_consumers_follow_their_producers(&spans);
    let touched: std::collections::BTreeSet<_> = spans.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        touched.into_iter().collect::<Vec<_>>(),
        ["inventory", "order", "payment"]
    );

    // Each service's /metrics counted what it did.
    let (_, metrics) = http_get(services["order"].http, "/metrics").await.unwrap();
    assert!(
        metrics.contains(r#"shop_sagas_ended_total{outcome="confirmed",reason=""} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"shop_sagas_ended_total{outcome="cancelled",reason="insufficient funds"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"shop_grpc_requests_total{method="shop.order.v1.OrderService/PlaceOrder",code="Ok"} 2"#
        ),
        "{metrics}"
    );
    let (_, metrics) = http_get(services["inventory"].http, "/metrics")
        .await
        .unwrap();
    assert!(
        metrics.contains(
            r#"shop_events_consumed_total{consumer="inventory",subject="order.placed",outcome="ok"} 2"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"shop_events_published_total{subject="inventory.reserved"} 2"#),
        "{metrics}"
    );

    for process in services.values_mut() {
        assert!(process.terminate().await.success());
    }
    server.abort();
}

/// Through a payment provider the saga stays one trace: the worker's call
/// and the events its outcome writes (by the answer or a webhook) continue
/// the trace that the reservation carried to the payment service.
#[tokio::test(flavor = "multi_thread")]
async fn a_saga_through_a_payment_provider_is_one_trace() {
    let (collector, otlp_port, server) = Collector::start(free_port());
    let infra = TestInfra::start().await;
    let provider = ProviderProcess::start("{}", 1).await;
    let mut services = start_services(&infra, otlp_port, |name| {
        if name == "payment" {
            ProviderProcess::payment_env(provider.port, 2_000)
        } else {
            Vec::new()
        }
    })
    .await;
    provider
        .send_webhooks_to(&format!(
            "http://127.0.0.1:{}/webhooks/provider",
            services["payment"].http
        ))
        .await;
    let channel = |name: &str| processes::admin_channel(services[name].endpoint());
    let user_id = UserServiceClient::new(channel("user"))
        .create_user(CreateUserRequest {
            email: "pia@example.com".into(),
            name: "Pia".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
        .user_id;
    InventoryServiceClient::new(channel("inventory"))
        .create_product(CreateProductRequest {
            sku: "LAMP".into(),
            name: "Lamp".into(),
            price_cents: 1999,
            stock: 5,
        })
        .await
        .unwrap();
    let mut orders = OrderServiceClient::new(channel("order"));
    let trace = "5bf92f3577b34da6a3ce929d0e0e4737";
    let request = PlaceOrderRequest {
        user_id,
        items: vec![OrderItem {
            sku: "LAMP".into(),
            quantity: 1,
        }],
        idempotency_key: "lamp".into(),
    };
    let order = place_order(
        &mut orders,
        with_traceparent(request, trace, "c7ad6b7169203331"),
    )
    .await;
    assert_eq!(
        settled(&mut orders, &order.order_id).await.status(),
        OrderStatus::Confirmed
    );
    let spans = collector
        .wait_for(
            trace,
            &[
                ("inventory", "order.placed"),
                ("payment", "inventory.reserved"),
                ("order", "payment.completed"),
                ("inventory", "order.confirmed"),
            ],
        )
        .await;
    assert_consumers_follow_their_producers(&spans);
    // The call ends after the publish of its outcome, and may be exported
    // in the payment service's next batch.
    collector
        .wait_for_span(trace, "payment", "provider call")
        .await;
    let ledger = provider.ledger().await.unwrap();
    assert_eq!(ledger["payments"][0]["reference"], order.order_id);
    for process in services.values_mut() {
        assert!(process.terminate().await.success());
    }
    server.abort();
}
