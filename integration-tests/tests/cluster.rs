//! The services on the production shape of JetStream: a three-node cluster
//! with R3 streams, every service given all three URLs, two replicas of the
//! order service (both relays and both sweepers at work). While orders flow,
//! the `ORDER` stream's leader is killed and started again, the `PAYMENT`
//! stream's leader is paused (SIGSTOP) past its peers' timeouts and
//! resumed, and every node is restarted in turn. Then every saga has ended
//! confirmed, once, and no stream holds a message twice.

#![allow(clippy::unwrap_used)]

mod processes;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use processes::{ServiceProcess, place_order, settled};
use shop_proto::order::v1::order_service_client::OrderServiceClient;
use shop_proto::order::v1::{OrderItem, OrderStatus, PlaceOrderRequest};
use shop_test_support::{TestNatsCluster, TestPostgres};

const STREAMS: [&str; 4] = ["USER", "ORDER", "INVENTORY", "PAYMENT"];

/// The service processes: two of the order service.
const PROCESSES: [(&str, usize); 5] = [
    ("user", 0),
    ("order", 0),
    ("order", 1),
    ("inventory", 0),
    ("payment", 0),
];

async fn leader_of(js: &jetstream::Context, stream: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut handle) = js.get_stream(stream).await
            && let Ok(info) = handle.info().await
            && let Some(leader) = info.cluster.as_ref().and_then(|c| c.leader.clone())
        {
            return leader;
        }
        assert!(Instant::now() < deadline, "{stream} has no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every replica of every stream is current again.
async fn all_current(js: &jetstream::Context) {
    let deadline = Instant::now() + Duration::from_secs(60);
    'wait: loop {
        assert!(
            Instant::now() < deadline,
            "the streams' replicas did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        for stream in STREAMS {
            let Ok(mut handle) = js.get_stream(stream).await else {
                continue 'wait;
            };
            let Ok(info) = handle.info().await else {
                continue 'wait;
            };
            let Some(cluster) = &info.cluster else {
                continue 'wait;
            };
            assert_eq!(info.config.num_replicas, 3, "{stream} is not R3");
            if cluster.leader.is_none()
                || cluster.replicas.len() != 2
                || cluster
                    .replicas
                    .iter()
                    .any(|peer| !peer.current || peer.offline)
            {
                continue 'wait;
            }
        }
        return;
    }
}

/// Every message of `stream` by its `Nats-Msg-Id`, and how many times each
/// subject occurs.
async fn read_stream(js: &jetstream::Context, stream: &str) -> (Vec<String>, HashMap<String, u64>) {
    let mut handle = js.get_stream(stream).await.unwrap();
    let state = handle.info().await.unwrap().state.clone();
    let (mut ids, mut subjects) = (Vec::new(), HashMap::<String, u64>::new());
    if state.messages == 0 {
        return (ids, subjects);
    }
    for sequence in state.first_sequence..=state.last_sequence {
        let message = handle.get_raw_message(sequence).await.unwrap();
        let id = message
            .headers
            .get("Nats-Msg-Id")
            .map(|value| value.as_str().to_owned())
            .unwrap_or_default();
        ids.push(id);
        *subjects.entry(message.subject.to_string()).or_default() += 1;
    }
    (ids, subjects)
}

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
    all_current(&js).await;
    // The PAYMENT stream's leader, frozen past its peers' election timeout.
    let leader = cluster.index_of(&leader_of(&js, "PAYMENT").await).unwrap();
    cluster.node(leader).pause();
    tokio::time::sleep(Duration::from_secs(10)).await;
    cluster.node(leader).resume();
    all_current(&js).await;
    // A rolling restart of the whole cluster.
    for node in 0..cluster.len() {
        cluster.node(node).stop();
        tokio::time::sleep(Duration::from_secs(1)).await;
        cluster.node(node).start_again().await;
        all_current(&js).await;
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
    all_current(&js).await;
    for stream in STREAMS {
        let (ids, _) = read_stream(&js, stream).await;
        let unique: HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "{stream} holds a message twice");
        assert!(
            ids.iter().all(|id| !id.is_empty()),
            "{stream}: a message without an id"
        );
    }
    let (_, subjects) = read_stream(&js, "ORDER").await;
    assert_eq!(
        subjects.get("order.confirmed").copied(),
        Some(placed.len() as u64),
        "one order.confirmed per order: {subjects:?}"
    );
    assert_eq!(subjects.get("order.cancelled"), None, "{subjects:?}");
}
