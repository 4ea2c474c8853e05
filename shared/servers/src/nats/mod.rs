//! A real `nats-server -js` for one test.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

mod cluster;

use cluster::ClusterNode;
pub use cluster::NatsCluster;

use crate::ServerError;
use crate::binaries;
use crate::ports::ensure_port_free;
use crate::process::{ServerProcess, Workdir, free_port, send_signal};

const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A configuration file for the server, the environment it reads, and the
/// user the harness connects as.
#[derive(Debug, Clone)]
struct ServerConfig {
    file: PathBuf,
    env: Vec<(String, String)>,
    user: (String, String),
}

/// A JetStream-enabled NATS server on a free port of 127.0.0.1, storing its
/// streams in a temporary directory. Dropping it stops the server and deletes
/// the store.
#[derive(Debug)]
pub struct Nats {
    binary: PathBuf,
    port: u16,
    config: Option<ServerConfig>,
    /// The monitoring port (`/varz`, `/jsz`), when the store is kept.
    monitor_port: Option<u16>,
    /// Its place in a cluster, when it is one of [`NatsCluster`]'s.
    node: Option<ClusterNode>,
    process: Option<ServerProcess>,
    // Declared last so that the server is gone before its store is removed.
    dir: Workdir,
}

impl Nats {
    /// Starts a server; panics with a one-line reason if it cannot.
    pub async fn start() -> Self {
        Self::try_start()
            .await
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// Starts a server, or says why it could not.
    pub async fn try_start() -> Result<Self, ServerError> {
        Self::try_start_configured(None).await
    }

    /// Starts a server with the configuration `file`, which reads `env`
    /// (port, address and store come from the harness); the harness and
    /// [`client`](Self::client) connect as `user` with `password`.
    pub async fn start_with_config(
        file: &std::path::Path,
        env: &[(&str, &str)],
        user: &str,
        password: &str,
    ) -> Self {
        let config = ServerConfig {
            file: file.to_path_buf(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            user: (user.to_owned(), password.to_owned()),
        };
        Self::try_start_configured(Some(config))
            .await
            .unwrap_or_else(|error| panic!("{error}"))
    }

    async fn try_start_configured(config: Option<ServerConfig>) -> Result<Self, ServerError> {
        let binary = binaries::nats_server()?;
        let dir = Workdir::Temporary(
            tempfile::Builder::new()
                .prefix("shop-test-nats-")
                .tempdir()
                .map_err(|source| ServerError::Io {
                    context: "cannot create a NATS store".into(),
                    source,
                })?,
        );
        let mut nats = Self {
            binary,
            port: 0,
            config,
            monitor_port: None,
            node: None,
            process: None,
            dir,
        };
        let mut last_error = None;
        // A free port can be taken between probing and binding: try a few.
        for _ in 0..3 {
            nats.port = free_port()?;
            match nats.launch().await {
                Ok(()) => return Ok(nats),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    /// Starts a server whose store lives in `dir`, kept between runs, on
    /// `port`, with its HTTP monitoring endpoints on `monitor_port` when
    /// given. The server stops when the handle is dropped; the store stays.
    pub async fn start_in(
        dir: &std::path::Path,
        port: u16,
        monitor_port: Option<u16>,
    ) -> Result<Self, ServerError> {
        ensure_port_free("nats-server", port).await?;
        if let Some(monitor_port) = monitor_port {
            ensure_port_free("nats-server monitoring", monitor_port).await?;
        }
        let mut nats = Self {
            binary: binaries::nats_server()?,
            port,
            config: None,
            monitor_port,
            node: None,
            process: None,
            dir: Workdir::kept(dir)?,
        };
        nats.launch().await?;
        Ok(nats)
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connection options as the harness's user, when the server has users.
    fn options(&self) -> async_nats::ConnectOptions {
        let options = async_nats::ConnectOptions::new();
        match &self.config {
            Some(ServerConfig {
                user: (user, password),
                ..
            }) => options.user_and_password(user.clone(), password.clone()),
            None => options,
        }
    }

    /// A new client connection to this server.
    pub async fn client(&self) -> async_nats::Client {
        self.options()
            .connect(self.url())
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "cannot connect to the test NATS server at {}: {error}",
                    self.url()
                )
            })
    }

    /// How many messages `stream` holds now.
    pub async fn stored(&self, stream: &str) -> u64 {
        async_nats::jetstream::new(self.client().await)
            .get_stream(stream)
            .await
            .unwrap_or_else(|error| panic!("no stream {stream}: {error}"))
            .info()
            .await
            .unwrap_or_else(|error| panic!("no info on stream {stream}: {error}"))
            .state
            .messages
    }

    /// The last message on `subject` of `stream`, waiting up to `timeout` for
    /// the stream and a message to appear.
    pub async fn last_message(
        &self,
        stream: &str,
        subject: &str,
        timeout: Duration,
    ) -> Option<async_nats::jetstream::message::StreamMessage> {
        let js = async_nats::jetstream::new(self.client().await);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(stream) = js.get_stream(stream).await
                && let Ok(message) = stream.get_last_raw_message_by_subject(subject).await
            {
                return Some(message);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        self.process
            .as_mut()
            .is_some_and(|process| process.exited().is_none())
    }

    /// Kills the server with SIGKILL, as a crash would; the store stays.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.terminate(libc::SIGKILL, Duration::from_secs(5));
        }
    }

    /// Freezes the server (SIGSTOP), as a stalled machine would: its
    /// connections stay open and nothing answers on them.
    pub fn pause(&mut self) {
        if let Some(process) = &self.process {
            send_signal(process.pid(), libc::SIGSTOP);
        }
    }

    /// Lets a [paused](Self::pause) server run again (SIGCONT).
    pub fn resume(&mut self) {
        if let Some(process) = &self.process {
            send_signal(process.pid(), libc::SIGCONT);
        }
    }

    /// The server's name (`shop-test`, or `n1`… in a cluster).
    pub fn name(&self) -> &str {
        self.node.as_ref().map_or("shop-test", |node| &node.name)
    }

    /// Stops the server gracefully (SIGTERM); the store stays.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.terminate(libc::SIGTERM, Duration::from_secs(10));
        }
    }

    /// Deletes the store of a server that is not running, as a lost disk
    /// would: [`start_again`](Self::start_again) then starts it empty.
    pub fn lose_store(&mut self) {
        assert!(
            self.process.is_none(),
            "the test NATS server is still running"
        );
        let store = self.dir.path().join("store");
        if store.exists() {
            std::fs::remove_dir_all(&store).expect("cannot delete the NATS store");
        }
    }

    /// Starts the server again on the same port and store, after [`kill`] or
    /// [`stop`], and waits until JetStream answers. A port that a client
    /// was given as its local end meanwhile is waited for first, at most
    /// [`PORT_PATIENCE`](crate::PORT_PATIENCE).
    ///
    /// [`kill`]: Self::kill
    /// [`stop`]: Self::stop
    pub async fn start_again(&mut self) {
        assert!(
            self.process.is_none(),
            "the test NATS server is still running"
        );
        // While it was down, a client (one reconnecting to it, say) may
        // have been given one of its ports as its local end.
        let route_port = self.node.as_ref().map(|node| node.route_port);
        for (what, port) in [
            ("nats-server", Some(self.port)),
            ("nats-server monitoring", self.monitor_port),
            ("nats-server routes", route_port),
        ] {
            if let Some(port) = port {
                ensure_port_free(what, port)
                    .await
                    .unwrap_or_else(|error| panic!("{error}"));
            }
        }
        // The old socket may linger for a moment after a kill.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.launch().await {
                Ok(()) => return,
                Err(error) if Instant::now() >= deadline => panic!("{error}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn launch(&mut self) -> Result<(), ServerError> {
        let mut command = Command::new(&self.binary);
        command
            .arg("--jetstream")
            .args(["--addr", "127.0.0.1"])
            .args(["--port", &self.port.to_string()])
            .arg("--store_dir")
            .arg(self.dir.path().join("store"));
        match &self.node {
            None => {
                command.args(["--server_name", "shop-test"]);
            }
            Some(node) => {
                let routes: Vec<String> = node
                    .peers
                    .iter()
                    .map(|port| format!("nats://127.0.0.1:{port}"))
                    .collect();
                command
                    .args(["--server_name", &node.name])
                    .args(["--cluster_name", "shop-test"])
                    .arg("--cluster")
                    .arg(format!("nats://127.0.0.1:{}", node.route_port))
                    .arg("--routes")
                    .arg(routes.join(","));
            }
        }
        if let Some(config) = &self.config {
            // Flags take precedence over the file: port, address and store
            // stay the harness's.
            command.arg("--config").arg(&config.file);
            // The file's monitoring port would collide between tests.
            command.args(["--http_port", &free_port()?.to_string()]);
            command.envs(config.env.iter().map(|(k, v)| (k, v)));
        } else if let Some(monitor_port) = self.monitor_port {
            command.args(["--http_port", &monitor_port.to_string()]);
        }
        let mut process = ServerProcess::spawn(command, &self.dir.path().join("nats.log"), None)?;
        process
            .wait_ready("nats-server", self.port, READY_TIMEOUT, || {
                self.jetstream_ready()
            })
            .await?;
        self.process = Some(process);
        Ok(())
    }

    /// JetStream answers an account query: the server accepts clients and its
    /// store is open.
    async fn jetstream_ready(&self) -> bool {
        let options = self
            .options()
            .connection_timeout(Duration::from_millis(500));
        let Ok(client) = options.connect(self.url()).await else {
            return false;
        };
        let ready = tokio::time::timeout(
            Duration::from_secs(2),
            async_nats::jetstream::new(client.clone()).query_account(),
        )
        .await
        .is_ok_and(|answer| answer.is_ok());
        drop(client);
        ready
    }
}
