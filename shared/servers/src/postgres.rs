//! A throwaway PostgreSQL cluster for one test.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use diesel_async::{AsyncConnection as _, AsyncPgConnection, SimpleAsyncConnection as _};

use crate::ServerError;
use crate::binaries;
use crate::ports::ensure_port_free;
use crate::process::{ServerProcess, Workdir, free_port, log_tail};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A PostgreSQL cluster initialised into a temporary directory and listening
/// on a free port of 127.0.0.1, tuned for tests (fsync off: a crash of the
/// machine would lose it, a crash of the server does not). Dropping it shuts
/// the cluster down and deletes its data.
#[derive(Debug)]
pub struct Postgres {
    bin_dir: PathBuf,
    user: Option<(u32, u32)>,
    port: u16,
    durable: bool,
    /// Server settings (`name=value`) on top of the harness's.
    settings: Vec<String>,
    process: Option<ServerProcess>,
    // Declared last so that the server is gone before its data is removed.
    dir: Workdir,
}

impl Postgres {
    /// Initialises and starts a cluster; panics with a one-line reason if it
    /// cannot.
    pub async fn start() -> Self {
        Self::try_start()
            .await
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// Initialises and starts a cluster, or says why it could not.
    pub async fn try_start() -> Result<Self, ServerError> {
        Self::try_start_with(false, &[]).await
    }

    /// [`try_start`](Self::try_start), with `settings` (`name=value`, as
    /// `postgres -c`) on top of the harness's: for example
    /// `shared_preload_libraries=pg_stat_statements` to count statements.
    pub async fn try_start_with_settings(settings: &[String]) -> Result<Self, ServerError> {
        Self::try_start_with(false, settings).await
    }

    /// Initialises and starts a cluster that flushes to disk like a
    /// production server (fsync and full-page writes on), for benchmarks.
    pub async fn start_durable() -> Self {
        Self::try_start_with(true, &[])
            .await
            .unwrap_or_else(|error| panic!("{error}"))
    }

    async fn try_start_with(durable: bool, settings: &[String]) -> Result<Self, ServerError> {
        let bin_dir = binaries::postgres_bin_dir()?;
        let user = server_user()?;
        let dir = Workdir::Temporary(
            tempfile::Builder::new()
                .prefix("shop-test-pg-")
                .tempdir()
                .map_err(|source| ServerError::Io {
                    context: "cannot create a PostgreSQL directory".into(),
                    source,
                })?,
        );
        let mut postgres = Self {
            bin_dir,
            user,
            port: 0,
            durable,
            settings: settings.to_vec(),
            process: None,
            dir,
        };
        postgres.init().await?;
        let mut last_error = None;
        // A free port can be taken between probing and binding: try a few.
        for _ in 0..3 {
            postgres.port = free_port()?;
            match postgres.launch().await {
                Ok(()) => return Ok(postgres),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    /// Starts a durable cluster (fsync on) whose data lives in `dir`, kept
    /// between runs, on `port`: initialised on first use, reused after, and
    /// given `settings` (`name=value`, as `postgres -c`) on top of the
    /// harness's. The cluster stops when the handle is dropped; the data
    /// stays.
    pub async fn start_in(
        dir: &std::path::Path,
        port: u16,
        settings: &[String],
    ) -> Result<Self, ServerError> {
        ensure_port_free("postgres", port).await?;
        let postgres = Self {
            bin_dir: binaries::postgres_bin_dir()?,
            user: server_user()?,
            port,
            durable: true,
            settings: settings.to_vec(),
            process: None,
            dir: Workdir::kept(dir)?,
        };
        let mut postgres = postgres;
        if !postgres.data_dir().join("PG_VERSION").exists() {
            if postgres.data_dir().exists() {
                std::fs::remove_dir_all(postgres.data_dir()).map_err(|source| ServerError::Io {
                    context: "cannot clear a half-initialised data directory".into(),
                    source,
                })?;
            }
            postgres.init().await?;
        }
        postgres.launch().await?;
        Ok(postgres)
    }

    /// The port the cluster listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory of the cluster's Unix socket: its own directory, when
    /// that path fits a socket address and a server setting.
    pub fn socket_dir(&self) -> Option<&str> {
        let dir = self.dir.path().to_str()?;
        let socket = format!("{dir}/.s.PGSQL.{}", self.port);
        let plain = dir.starts_with('/') && !dir.contains([',', '"', '\\']) && dir.trim() == dir;
        // The kernel's limit for a socket path, with its terminating NUL.
        (plain && socket.len() < 108).then_some(dir)
    }

    /// The URL of database `database` as `role`, through the Unix socket
    /// when there is one (cheaper than TCP for a server on the same
    /// machine), else through TCP.
    pub fn local_url(&self, role: &str, database: &str) -> String {
        match self.socket_dir() {
            Some(dir) => {
                let host: String = dir
                    .bytes()
                    .map(|b| match b {
                        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                            char::from(b).to_string()
                        }
                        _ => format!("%{b:02X}"),
                    })
                    .collect();
                format!("postgres://{role}@{host}:{}/{database}", self.port)
            }
            None => format!("postgres://{role}@127.0.0.1:{}/{database}", self.port),
        }
    }

    /// The URL of database `name` as the superuser `postgres`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates an empty database called `name` and returns its URL; panics if
    /// it cannot (a name already taken included).
    pub async fn create_database(&self, name: &str) -> String {
        assert!(
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "test database names are lowercase letters, digits and underscores, not {name:?}"
        );
        let mut admin = self
            .connect("postgres")
            .await
            .unwrap_or_else(|error| panic!("{error}"));
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|error| panic!("cannot create test database {name}: {error}"));
        self.url(name)
    }

    /// Whether the cluster is running.
    pub fn is_running(&mut self) -> bool {
        self.process
            .as_mut()
            .is_some_and(|process| process.exited().is_none())
    }

    /// Stops the cluster at once (SIGQUIT, PostgreSQL's immediate shutdown:
    /// no checkpoint, as after a crash); the data stays.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.terminate(libc::SIGQUIT, Duration::from_secs(10));
        }
    }

    /// Stops the cluster cleanly (SIGINT, PostgreSQL's fast shutdown); the data
    /// stays.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.terminate(libc::SIGINT, Duration::from_secs(20));
        }
    }

    /// Starts the cluster again on the same port and data, after [`kill`] or
    /// [`stop`], and waits until it accepts connections. A port that a
    /// client was given as its local end meanwhile is waited for first, at
    /// most [`PORT_PATIENCE`](crate::PORT_PATIENCE).
    ///
    /// [`kill`]: Self::kill
    /// [`stop`]: Self::stop
    pub async fn start_again(&mut self) {
        assert!(
            self.process.is_none(),
            "the test PostgreSQL cluster is still running"
        );
        // While it was down, a client (one reconnecting to it, say) may
        // have been given its port as its local end.
        ensure_port_free("postgres", self.port)
            .await
            .unwrap_or_else(|error| panic!("{error}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.launch().await {
                Ok(()) => return,
                Err(error) if Instant::now() >= deadline => panic!("{error}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    async fn init(&self) -> Result<(), ServerError> {
        let data = self.data_dir();
        std::fs::create_dir(&data).map_err(|source| ServerError::Io {
            context: format!("cannot create {}", data.display()),
            source,
        })?;
        if let Some((uid, gid)) = self.user {
            for path in [self.dir.path(), data.as_path()] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|source| {
                    ServerError::Io {
                        context: format!("cannot hand {} to the postgres user", path.display()),
                        source,
                    }
                })?;
            }
        }
        let mut command = Command::new(self.bin_dir.join("initdb"));
        command
            .arg("--pgdata")
            .arg(&data)
            .args([
                "--auth",
                "trust",
                "--username",
                "postgres",
                "--encoding",
                "UTF8",
            ])
            .args(["--no-locale", "--no-sync", "--no-instructions"]);
        let log = self.dir.path().join("initdb.log");
        let mut process = ServerProcess::spawn(command, &log, self.user)?;
        let status = loop {
            match process.exited() {
                Some(status) => break status,
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        if !status.success() {
            return Err(ServerError::Start {
                what: "initdb",
                detail: format!("{status}: {}", log_tail(&log)),
            });
        }
        Ok(())
    }

    async fn launch(&mut self) -> Result<(), ServerError> {
        let mut command = Command::new(self.bin_dir.join("postgres"));
        command
            .arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.socket_dir().unwrap_or_default()
            ))
            .args(["-c", "max_connections=300"])
            // The servers' tables start empty and grow fast: statement plans
            // cached while a table was nearly empty (a scan of the whole
            // table, right for a page) last until it is next analyzed, so
            // autovacuum looks every few seconds instead of every minute.
            .args(["-c", "autovacuum_naptime=5s"]);
        if !self.durable {
            // fsync off skips the disk flushes; synchronous_commit stays on so
            // that a commit is in the OS's cache before it is acknowledged and
            // survives a killed server, which the fault tests rely on.
            command.args(["-c", "fsync=off", "-c", "full_page_writes=off"]);
        }
        for setting in &self.settings {
            command.arg("-c").arg(setting);
        }
        let mut process =
            ServerProcess::spawn(command, &self.dir.path().join("postgres.log"), self.user)?;
        process
            .wait_ready("postgres", self.port, READY_TIMEOUT, || async {
                self.connect("postgres").await.is_ok()
            })
            .await?;
        self.process = Some(process);
        Ok(())
    }

    /// Connects as the readiness probe does: through the Unix socket when
    /// there is one. PostgreSQL creates every listening socket before it
    /// accepts a connection, so the TCP port is up too; and a probe over TCP
    /// that the backend hangs up on first leaves the server's end on the
    /// port for a minute (TIME_WAIT).
    async fn connect(&self, database: &str) -> Result<AsyncPgConnection, ServerError> {
        AsyncPgConnection::establish(&self.local_url("postgres", database))
            .await
            .map_err(|error| ServerError::Database {
                context: format!("cannot connect to the test cluster on port {}", self.port),
                detail: error.to_string(),
            })
    }
}

impl Drop for Postgres {
    /// Shuts the server down (immediately for a throwaway cluster, cleanly
    /// for one whose data is kept) rather than killing it: PostgreSQL removes
    /// its shared memory, a System V segment and files in `/dev/shm`, only on
    /// a shutdown of its own. A killed postmaster leaves them to the machine,
    /// and a few thousand test clusters later no new one can start (`shmget`
    /// fails with every segment id taken).
    fn drop(&mut self) {
        match self.dir {
            Workdir::Temporary(_) => self.kill(),
            Workdir::Kept(_) => self.stop(),
        }
    }
}

/// The uid and gid to run the server as: the `postgres` user when we are root
/// (PostgreSQL refuses to run as root), else ourselves.
fn server_user() -> Result<Option<(u32, u32)>, ServerError> {
    if effective_uid() != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|source| ServerError::Io {
        context: "cannot read /etc/passwd".into(),
        source,
    })?;
    passwd_entry(&passwd, "postgres").map(Some).ok_or_else(|| {
        ServerError::Missing(
            "running as root, but there is no `postgres` user to run PostgreSQL as: run `scripts/bootstrap` (or `apt-get install postgresql`)".into(),
        )
    })
}

fn passwd_entry(passwd: &str, name: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then_some(())?;
        let _password = fields.next()?;
        Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
    })
}

fn effective_uid() -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    // /proc/self belongs to the process's effective uid; reading it avoids an
    // unsafe libc call.
    std::fs::metadata("/proc/self")
        .map(|meta| meta.uid())
        .unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_user_in_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\npostgres:x:101:104:PostgreSQL administrator:/var/lib/postgresql:/bin/bash\n";
        assert_eq!(passwd_entry(passwd, "postgres"), Some((101, 104)));
        assert_eq!(passwd_entry(passwd, "nobody"), None);
    }

    /// The shared memory segment ids in use on this machine.
    fn segment_ids() -> Vec<String> {
        let table = std::fs::read_to_string("/proc/sysvipc/shm").expect("the segment table");
        table
            .lines()
            .skip(1)
            .filter_map(|line| line.split_whitespace().nth(1).map(str::to_owned))
            .collect()
    }

    #[tokio::test]
    async fn a_dropped_cluster_leaves_no_shared_memory_behind() {
        let postgres = Postgres::start().await;
        // The seventh line of postmaster.pid holds the segment's key and id.
        let pid_file = std::fs::read_to_string(postgres.data_dir().join("postmaster.pid"))
            .expect("the running cluster's postmaster.pid");
        let id = pid_file
            .lines()
            .nth(6)
            .and_then(|line| line.split_whitespace().nth(1))
            .expect("a shared memory id in postmaster.pid")
            .to_owned();
        assert!(segment_ids().contains(&id), "segment {id} while running");

        drop(postgres);
        assert!(
            !segment_ids().contains(&id),
            "segment {id} is still there after the cluster was dropped"
        );
    }
}
