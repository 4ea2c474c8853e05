//! The harness's JetStream cluster: three real `nats-server`s routed to each
//! other, an R3 stream on them, and a client given every node's URL. The
//! stream keeps every message, once, through its leader killed and started
//! again, and through its leader paused (SIGSTOP) past its peers' timeouts,
//! which must rejoin and catch up, and through a node that lost its store,
//! which is rebuilt from the other two.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage, stream};
use shop_servers::NatsCluster;

const WAIT: Duration = Duration::from_secs(30);

async fn replicated_stream(cluster: &NatsCluster) -> jetstream::Context {
    let js = jetstream::new(cluster.client().await);
    js.create_stream(stream::Config {
        name: "EVENTS".into(),
        subjects: vec!["events.>".into()],
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    js
}

/// Publishes messages `ids` with their ids as `Nats-Msg-Id`, each tried
/// again until JetStream acknowledges it: a retry whose first try did land
/// is dropped by the stream's duplicate window.
async fn publish(js: &jetstream::Context, ids: std::ops::Range<u32>) {
    for id in ids {
        let deadline = Instant::now() + WAIT;
        loop {
            let message = PublishMessage::build()
                .message_id(format!("m-{id}"))
                .payload(id.to_string().into());
            let acked = match js.send_publish("events.e", message).await {
                Ok(ack) => ack.await.is_ok(),
                Err(_) => false,
            };
            if acked {
                break;
            }
            assert!(Instant::now() < deadline, "message {id} never acknowledged");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn cluster_info(js: &jetstream::Context) -> Option<(u64, stream::ClusterInfo)> {
    let mut events = js.get_stream("EVENTS").await.ok()?;
    let info = events.info().await.ok()?;
    Some((info.state.messages, info.cluster.clone()?))
}

async fn leader(js: &jetstream::Context) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some((_, cluster)) = cluster_info(js).await
            && let Some(leader) = cluster.leader
        {
            return leader;
        }
        assert!(Instant::now() < deadline, "the stream has no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the stream holds `messages` and every replica, `node` among
/// them, is current (caught up with the leader).
async fn caught_up(js: &jetstream::Context, node: &str, messages: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let seen = cluster_info(js).await;
        if let Some((stored, cluster)) = &seen
            && *stored == messages
            && cluster.leader.is_some()
            && cluster.replicas.len() == 2
            && cluster
                .replicas
                .iter()
                .all(|peer| peer.current && !peer.offline)
            && (cluster.leader.as_deref() == Some(node)
                || cluster.replicas.iter().any(|peer| peer.name == node))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{node} did not catch up with {messages} messages: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A cluster with an R3 stream of 50 messages, and its leader: name and
/// node.
async fn stream_of_fifty() -> (NatsCluster, jetstream::Context, String, usize) {
    let cluster = NatsCluster::start(3).await;
    let js = replicated_stream(&cluster).await;
    publish(&js, 0..50).await;
    let leader = leader(&js).await;
    let index = cluster.index_of(&leader).unwrap();
    (cluster, js, leader, index)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replicated_stream_keeps_every_message_once_through_its_leader_killed_and_back() {
    let (mut cluster, js, old_leader, index) = stream_of_fifty().await;
    cluster.node(index).kill();
    // The client moves to another node; the two left elect a new leader.
    publish(&js, 50..100).await;
    let new_leader = leader(&js).await;
    assert_ne!(new_leader, old_leader, "a killed node is still the leader");

    cluster.node(index).start_again().await;
    caught_up(&js, &old_leader, 100).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_leader_is_replaced_then_rejoins_and_catches_up() {
    let (mut cluster, js, old_leader, index) = stream_of_fifty().await;
    cluster.node(index).pause();
    // Its connections stay open and silent: the client gives up on it and
    // the peers elect a leader without it.
    publish(&js, 50..100).await;
    let new_leader = leader(&js).await;
    assert_ne!(new_leader, old_leader, "a paused node is still the leader");

    cluster.node(index).resume();
    publish(&js, 100..120).await;
    caught_up(&js, &old_leader, 120).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_lost_its_store_is_rebuilt_from_the_other_two() {
    let (mut cluster, js, old_leader, index) = stream_of_fifty().await;
    cluster.node(index).kill();
    cluster.node(index).lose_store();
    publish(&js, 50..100).await;
    assert_ne!(
        leader(&js).await,
        old_leader,
        "a dead node is still the leader"
    );

    // Back with an empty disk, under its old name: it rejoins as a replica
    // and is sent the whole stream.
    cluster.node(index).start_again().await;
    caught_up(&js, &old_leader, 100).await;
    // Its copy, read from it as the leader: one other node goes, and the
    // leader steps down until the rebuilt node leads.
    let other = (0..cluster.len()).find(|&i| i != index).unwrap();
    cluster.node(other).kill();
    let client = cluster.client().await;
    let js = jetstream::new(client.clone());
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some((messages, info)) = cluster_info(&js).await
            && info.leader.as_deref() == Some(old_leader.as_str())
        {
            assert_eq!(messages, 100, "the rebuilt node's copy");
            break;
        }
        assert!(Instant::now() < deadline, "the rebuilt node never led");
        let _ = client
            .request("$JS.API.STREAM.LEADER.STEPDOWN.EVENTS", "".into())
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
