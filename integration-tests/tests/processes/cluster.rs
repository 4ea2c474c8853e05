//! The services on the production shape of JetStream: a three-node cluster
//! with R3 streams, every service given all three URLs, two replicas of the
//! order service (both relays and both sweepers at work). While orders flow,
//! the `ORDER` stream's leader is killed and started again, the `PAYMENT`
//! stream's leader is paused (SIGSTOP) past its peers' timeouts and
//! resumed, and every node is restarted in turn. Then every saga has ended
//! confirmed, once, and no stream holds a message twice.

use shop_integration_tests::processes;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use processes::{ServiceProcess, all_current, check_streams, leader_of, place_order, settled};
use shop_proto::order::v1::order_service_client::OrderServiceClient;
use shop_proto::order::v1::{OrderItem, OrderStatus, PlaceOrderRequest};
use shop_test_support::{TestNatsCluster, TestPostgres};

/// The service processes: two of the order service.
const PROCESSES: [(&str, usize); 5] = [
    ("user", 0),
    ("order", 0),
    ("order", 1),
    ("inventory", 0),
    ("payment", 0),
];

#[tokio::test(flavor = "multi_thread")]
async fn sagas_ride_through_nats_nodes_lost_paused_and_restarted() {
    let (mut cluster, postgres) = tokio::join!(TestNatsCluster::start(3), TestPostgres::start());
    for service in ["user", "order", "inventory", "payment"] {
        postgres.create_database(&format!("shop_{service}")).await;
    }
    let mut services = HashMap::new();
    for (name, replica) in PROCESSES {
        let env = [
            ("STREAM_REPLICAS", "3".to_owned()),
            // Long enough that no NATS fault below times a saga out.
            ("SAGA_DEADLINE_MS", "60000".to_owned()),
        ];
        let url = postgres.url(&format!("shop_{name}"));
        services.insert(
            (name, replica),
            ServiceProcess::start(name, &url, &cluster.urls(), &env).await,
        );
    }
    let channel = |name: &str, replica: usize| {
        processes::admin_channel(services[&(name, replica)].endpoint())
    };
    let buyers = {
        let mut buyers = Vec::new();
        for i in 0..4 {
            buyers.push(
                processes::create_user(
                    services[&("user", 0)].endpoint(),
                    &format!("buyer{i}@example.com"),
                )
                .await,
            );
        }
        Arc::new(buyers)
    };
    processes::create_product(services[&("inventory", 0)].endpoint(), "LAMP", 1, 100_000).await;

    // Orders at about 20 a second, alternately to the two order replicas,
    // until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let driver = {
        let (stop, buyers) = (Arc::clone(&stop), Arc::clone(&buyers));
        let mut replicas = [
            OrderServiceClient::new(channel("order", 0)),
            OrderServiceClient::new(channel("order", 1)),
        ];
        tokio::spawn(async move {
            let mut placed = Vec::new();
            let mut index = 0usize;
            while !AtomicBool::load(&stop, Ordering::Relaxed) {
                let request = tonic::Request::new(PlaceOrderRequest {
                    user_id: buyers[index % buyers.len()].clone(),
                    items: vec![OrderItem {
                        sku: "LAMP".into(),
                        quantity: 1,
                    }],
                    idempotency_key: format!("cluster-{index}"),
                });
                let order = place_order(&mut replicas[index % 2], request).await;
                placed.push(order.order_id);
                index += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            placed
        })
    };

    let js = jetstream::new(cluster.client().await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The ORDER stream's leader, killed and back.
    let leader = cluster.index_of(&leader_of(&js, "ORDER").await).unwrap();
    cluster.node(leader).kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.node(leader).start_again().await;
    all_current(&js, 3).await;
    // The PAYMENT stream's leader, frozen past its peers' election timeout.
    let leader = cluster.index_of(&leader_of(&js, "PAYMENT").await).unwrap();
    cluster.node(leader).pause();
    tokio::time::sleep(Duration::from_secs(10)).await;
    cluster.node(leader).resume();
    all_current(&js, 3).await;
    // A rolling restart of the whole cluster.
    for node in 0..cluster.len() {
        cluster.node(node).stop();
        tokio::time::sleep(Duration::from_secs(1)).await;
        cluster.node(node).start_again().await;
        all_current(&js, 3).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    AtomicBool::store(&stop, true, Ordering::Relaxed);
    let placed = driver.await.unwrap();
    assert!(placed.len() > 100, "only {} orders placed", placed.len());

    let mut orders = OrderServiceClient::new(channel("order", 0));
    for order_id in &placed {
        let order = settled(&mut orders, order_id).await;
        assert_eq!(order.status(), OrderStatus::Confirmed, "{order:?}");
    }
    all_current(&js, 3).await;
    assert_eq!(
        check_streams(&js, &placed).await,
        0,
        "a stream holds an event twice"
    );
    let subjects = processes::stream_events(&js, "ORDER")
        .await
        .into_iter()
        .fold(HashMap::<String, u64>::new(), |mut subjects, event| {
            *subjects.entry(event.subject).or_default() += 1;
            subjects
        });
    assert_eq!(
        subjects.get("order.confirmed").copied(),
        Some(placed.len() as u64),
        "one order.confirmed per order: {subjects:?}"
    );
    assert_eq!(subjects.get("order.cancelled"), None, "{subjects:?}");
}

/// A deployment starts the services and the JetStream nodes together: a
/// service whose cluster has no quorum yet keeps trying to provision its
/// streams (not ready meanwhile) instead of exiting, and is ready once the
/// cluster is.
#[tokio::test(flavor = "multi_thread")]
async fn a_service_started_before_its_cluster_has_a_quorum_waits_for_it() {
    let (mut cluster, postgres) = tokio::join!(TestNatsCluster::start(3), TestPostgres::start());
    postgres.create_database("shop_user").await;
    cluster.node(1).stop();
    cluster.node(2).stop();
    let mut service = ServiceProcess::launch(
        "user",
        &postgres.url("shop_user"),
        &cluster.urls(),
        &[("STREAM_REPLICAS", "3".to_owned())],
    );
    // One node of three: no meta leader, no stream can be made.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(service.running(), "the service gave up on the cluster");
    assert!(!service.ready().await, "ready without its stream");

    cluster.node(1).start_again().await;
    cluster.node(2).start_again().await;
    service.wait_ready().await;
    let js = jetstream::new(cluster.client().await);
    let mut stream = js.get_stream("USER").await.unwrap();
    assert_eq!(stream.info().await.unwrap().config.num_replicas, 3);
    assert!(service.terminate().await.success());
}

/// A node that hangs (SIGSTOP) keeps its connections open and silent. A
/// service given only that node leaves it once its pings go unanswered,
/// for a node the cluster told it of, and its events flow again while the
/// node is still hung.
#[tokio::test(flavor = "multi_thread")]
async fn a_service_leaves_a_hung_node_for_another() {
    let (mut cluster, postgres) = tokio::join!(TestNatsCluster::start(3), TestPostgres::start());
    postgres.create_database("shop_user").await;
    let only_the_first = cluster.node(0).url();
    let service = ServiceProcess::start(
        "user",
        &postgres.url("shop_user"),
        &only_the_first,
        &[("STREAM_REPLICAS", "3".to_owned())],
    )
    .await;
    let js = jetstream::new(cluster.node(1).client().await);
    let users_in_stream = async |expected: u64, within: Duration| {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(mut stream) = js.get_stream("USER").await
                && let Ok(info) = stream.info().await
                && info.state.messages == expected
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{expected} user.created never reached the stream"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    processes::create_user(service.endpoint(), "before@example.com").await;
    users_in_stream(1, Duration::from_secs(20)).await;

    cluster.node(0).pause();
    // Committed with its event in the outbox; the relay's connection is
    // to the hung node. Two unanswered pings ten seconds apart, then a
    // reconnect and the publish tried again: well within a minute (with
    // the client's default pings a minute apart, two).
    processes::create_user(service.endpoint(), "during@example.com").await;
    users_in_stream(2, Duration::from_secs(60)).await;
    cluster.node(0).resume();
}
