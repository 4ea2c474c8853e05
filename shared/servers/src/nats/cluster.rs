//! A JetStream cluster of real `nats-server`s on loopback, for tests that
//! lose nodes.

use std::time::{Duration, Instant};

use super::{Nats, READY_TIMEOUT};
use crate::ServerError;
use crate::binaries;
use crate::ports::ensure_port_free;
use crate::process::{Workdir, free_port};

/// Launches of a cluster's nodes before a failure to start is reported.
const LAUNCH_ATTEMPTS: u32 = 3;

/// A node's name and ports in a [`NatsCluster`].
#[derive(Debug, Clone)]
pub(super) struct ClusterNode {
    pub(super) name: String,
    pub(super) route_port: u16,
    /// The other nodes' route ports.
    pub(super) peers: Vec<u16>,
}

/// A JetStream cluster of real `nats-server`s on loopback: each node with its
/// own client and route ports and its own temporary store, routes to every
/// other. Nodes are killed, stopped, paused and started again one at a time
/// through [`node`](Self::node); clients are given every node's URL.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<Nats>,
}

impl NatsCluster {
    /// Starts `size` nodes at once (JetStream in a cluster waits for a
    /// quorum) and waits until each answers JetStream; panics with a reason
    /// if they do not.
    pub async fn start(size: usize) -> Self {
        Self::try_start(size)
            .await
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// Starts `size` nodes, or says why they could not be.
    pub async fn try_start(size: usize) -> Result<Self, ServerError> {
        let mut last_error = None;
        // A free port can be taken between probing and binding (by another
        // test's server, say): try a few times, each on new ports and stores.
        for _ in 0..3 {
            let mut nodes = Vec::with_capacity(size);
            for index in 0..size {
                let dir = Workdir::Temporary(
                    tempfile::Builder::new()
                        .prefix(&format!("shop-test-nats-n{}-", index + 1))
                        .tempdir()
                        .map_err(|source| ServerError::Io {
                            context: "cannot create a NATS store".into(),
                            source,
                        })?,
                );
                nodes.push((free_port()?, dir));
            }
            match Self::launch_all(nodes, None).await {
                Ok(cluster) => return Ok(cluster),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    /// Starts `size` nodes whose stores live in `dir/n1`, `dir/n2`, …, kept
    /// between runs, with client ports `first_port`, `first_port + 1`, …
    /// and the first node's monitoring endpoints on `monitor_port` when
    /// given. The nodes stop when the handle is dropped; the stores stay.
    pub async fn start_in(
        dir: &std::path::Path,
        first_port: u16,
        size: u16,
        monitor_port: Option<u16>,
    ) -> Result<Self, ServerError> {
        let mut nodes = Vec::new();
        for index in 0..size {
            let port = first_port.checked_add(index).ok_or(ServerError::Start {
                what: "nats-server",
                detail: format!("no port {first_port} + {index}"),
            })?;
            ensure_port_free("nats-server", port).await?;
            nodes.push((port, Workdir::kept(&dir.join(format!("n{}", index + 1)))?));
        }
        if let Some(monitor_port) = monitor_port {
            ensure_port_free("nats-server monitoring", monitor_port).await?;
        }
        Self::launch_all(nodes, monitor_port).await
    }

    /// Launches one node per (client port, store) at once (JetStream in a
    /// cluster waits for a quorum), routed to each other on free ports. A
    /// route port can be taken between probing and binding (an outgoing
    /// connection's ephemeral port, say): then the nodes that started are
    /// stopped and all are launched again on new route ports, with the same
    /// client ports and stores, up to three times.
    async fn launch_all(
        mut nodes: Vec<(u16, Workdir)>,
        monitor_port: Option<u16>,
    ) -> Result<Self, ServerError> {
        let binary = binaries::nats_server()?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let route_ports = nodes
                .iter()
                .map(|_| free_port())
                .collect::<Result<Vec<_>, _>>()?;
            let mut servers = Vec::with_capacity(nodes.len());
            for (index, ((port, dir), route_port)) in
                nodes.into_iter().zip(&route_ports).enumerate()
            {
                servers.push(Nats {
                    binary: binary.clone(),
                    port,
                    config: None,
                    monitor_port: monitor_port.filter(|_| index == 0),
                    node: Some(ClusterNode {
                        name: format!("n{}", index + 1),
                        route_port: *route_port,
                        peers: route_ports
                            .iter()
                            .copied()
                            .filter(|port| port != route_port)
                            .collect(),
                    }),
                    process: None,
                    dir,
                });
            }
            match futures::future::try_join_all(servers.iter_mut().map(Nats::launch)).await {
                Ok(_) => {
                    let cluster = Self { nodes: servers };
                    cluster.wait_formed().await?;
                    return Ok(cluster);
                }
                Err(error) if attempt >= LAUNCH_ATTEMPTS => return Err(error),
                Err(_) => {
                    nodes = servers
                        .into_iter()
                        .map(|server| {
                            // Stopped (and waited for) before its store is
                            // used again.
                            drop(server.process);
                            (server.port, server.dir)
                        })
                        .collect();
                }
            }
        }
    }

    /// Waits until the cluster can place a stream on every node: each node
    /// answering JetStream is not yet enough, its meta leader may not know
    /// all its peers ("no suitable peers for placement").
    async fn wait_formed(&self) -> Result<(), ServerError> {
        let servers = self.servers();
        let started = Instant::now();
        let mut last_error = String::new();
        while started.elapsed() < READY_TIMEOUT {
            if let Ok(client) = async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_millis(500))
                .connect(servers.clone())
                .await
            {
                let js = async_nats::jetstream::new(client);
                let probe = async_nats::jetstream::stream::Config {
                    name: "HARNESS_PLACEMENT_PROBE".into(),
                    subjects: vec!["harness.placement.probe".into()],
                    num_replicas: self.nodes.len(),
                    storage: async_nats::jetstream::stream::StorageType::Memory,
                    ..Default::default()
                };
                match js.create_stream(probe).await {
                    Ok(_) => {
                        js.delete_stream("HARNESS_PLACEMENT_PROBE")
                            .await
                            .map_err(|error| ServerError::Start {
                                what: "nats-server cluster",
                                detail: format!("cannot delete the placement probe: {error}"),
                            })?;
                        return Ok(());
                    }
                    Err(error) => last_error = error.to_string(),
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(ServerError::Start {
            what: "nats-server cluster",
            detail: format!("no stream could be placed on every node: {last_error}"),
        })
    }

    /// Every node's address, for a client that may use any of them.
    fn servers(&self) -> Vec<async_nats::ServerAddr> {
        self.nodes
            .iter()
            .map(|node| node.url().parse().expect("a valid URL"))
            .collect()
    }

    /// Every node's URL, comma-separated, as `NATS_URL` takes them.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(Nats::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `index` (from 0), to kill, stop, pause or start again.
    pub fn node(&mut self, index: usize) -> &mut Nats {
        &mut self.nodes[index]
    }

    /// Stops every node gracefully (SIGTERM); the stores stay.
    pub fn stop(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
    }

    /// How many nodes the cluster has.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Never: a cluster has at least one node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The index of the node called `name` (a stream's leader, say).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|node| node.name() == name)
    }

    /// A client given every node's URL, which moves to another node when
    /// its own goes away, or stops answering its pings (every second: a
    /// paused node is left within seconds).
    pub async fn client(&self) -> async_nats::Client {
        let servers = self.servers();
        async_nats::ConnectOptions::new()
            .ping_interval(Duration::from_secs(1))
            .retry_on_initial_connect()
            .connect(servers)
            .await
            .unwrap_or_else(|error| panic!("cannot connect to the test NATS cluster: {error}"))
    }
}
