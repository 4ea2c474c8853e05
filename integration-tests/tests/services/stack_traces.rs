//! Spans of a local stack, where the four services share one process as
//! under `shopctl up`: each span is exported under its service's own
//! `service.name`, so that Jaeger shows one saga as one trace made by
//! order, inventory and payment, as it does for the separate binaries.

use collector::Collector;
use shop::{Settings, Shop};
use shop_integration_tests::{collector, processes, shop};
use shop_proto::order::v1::OrderStatus;

#[tokio::test(flavor = "multi_thread")]
async fn one_process_exports_each_services_spans_under_its_own_name() {
    let (collector, port, _server) = Collector::start(processes::free_port());
    let telemetry = shop_service::Telemetry::init_stack_exporting_to(
        "shopctl",
        shop_service::LogFormat::Text,
        &format!("http://127.0.0.1:{port}"),
    )
    .unwrap();
    let mut shop = Shop::start(Settings::default()).await;
    let user = shop.create_user("spans@example.com").await;
    shop.create_product("LAMP", 1999, 5).await;
    let order = shop.place(&user, &[("LAMP", 1)], "").await.unwrap();
    let order = shop.settled(&order.order_id).await;
    assert_eq!(order.status(), OrderStatus::Confirmed);

    // The saga's trace: the order's placed step names it.
    let trace_id = {
        let started = std::time::Instant::now();
        loop {
            let found = collector
                .spans()
                .into_iter()
                .find(|span| span.attributes.get("order_id") == Some(&order.order_id))
                .map(|span| span.trace_id);
            if let Some(trace_id) = found {
                break trace_id;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(30),
                "no span names order {}",
                order.order_id
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    let spans = collector
        .wait_for(
            &trace_id,
            &[
                ("inventory", "order.placed"),
                ("payment", "inventory.reserved"),
                ("order", "payment.completed"),
                ("inventory", "order.confirmed"),
            ],
        )
        .await;
    let services: std::collections::BTreeSet<&str> =
        spans.iter().map(|span| span.service.as_str()).collect();
    assert_eq!(
        services,
        ["inventory", "order", "payment"].into_iter().collect(),
        "{:#?}",
        spans
            .iter()
            .map(|s| format!("{} {}", s.service, s.name))
            .collect::<Vec<_>>()
    );
    // The gRPC span is the order service's, and the spans of each service
    // carry that service's name (the process's own name is for the rest).
    let placed = spans
        .iter()
        .find(|span| span.name == "shop.order.v1.OrderService/PlaceOrder")
        .expect("the PlaceOrder span");
    assert_eq!(placed.service, "order");
    for span in &spans {
        if let Some(service) = span
            .attributes
            .get(pg_jetstream::telemetry::SERVICE_ATTRIBUTE)
        {
            assert_eq!(&span.service, service, "{span:?}");
        }
    }
    telemetry.shutdown().await;
}
