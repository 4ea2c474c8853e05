//! A child process that dies with its handle, and with the test process.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::ServerError;

/// A running server process. Dropping it kills the process and reaps it.
#[derive(Debug)]
pub(crate) struct ServerProcess {
    child: Child,
    log: PathBuf,
}

impl ServerProcess {
    /// Spawns `command` with stdout and stderr appended to `log`, as `user`
    /// (uid, gid) when given. The process also gets SIGKILL if the thread
    /// that started it dies without dropping the handle (a test killed by
    /// its runner), so no server outlives its test.
    pub(crate) fn spawn(
        mut command: Command,
        log: &Path,
        user: Option<(u32, u32)>,
    ) -> Result<Self, ServerError> {
        let io_error = |context: &str| {
            let context = format!("{context} {}", log.display());
            move |source| ServerError::Io { context, source }
        };
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io_error("cannot open log"))?;
        let err = out.try_clone().map_err(io_error("cannot open log"))?;
        command.stdin(Stdio::null()).stdout(out).stderr(err);
        use std::os::unix::process::CommandExt as _;
        if let Some((uid, gid)) = user {
            command.uid(uid).gid(gid);
        }
        // A process group of its own: a terminal's Ctrl-C goes to the whole
        // foreground group, and a server must not stop at the same instant
        // as the services still draining into it. Whoever started it stops
        // it (`shopctl up` last, after the services), or its death does.
        command.process_group(0);
        set_parent_death_signal(&mut command);
        let child = command.spawn().map_err(|source| ServerError::Io {
            context: format!("cannot run {:?}", command.get_program()),
            source,
        })?;
        Ok(Self {
            child,
            log: log.to_path_buf(),
        })
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has exited, with its status.
    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends `signal` and waits up to `grace` for the process to exit, then
    /// kills it.
    pub(crate) fn terminate(&mut self, signal: i32, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        send_signal(self.pid(), signal);
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Polls `ready` every 20 ms until it holds. Fails, with the tail of the
    /// log, if the process exits first or `timeout` passes.
    pub(crate) async fn wait_ready<F, Fut>(
        &mut self,
        what: &'static str,
        port: u16,
        timeout: Duration,
        mut ready: F,
    ) -> Result<(), ServerError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                let detail = format!("exited with {status} on port {port}: {}", self.log_tail());
                return Err(ServerError::Start { what, detail });
            }
            if ready().await {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                let detail = format!(
                    "not ready on port {port} after {timeout:?}: {}",
                    self.log_tail()
                );
                return Err(ServerError::Start { what, detail });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The last lines of the process's log, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        log_tail(&self.log)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last few lines of a log file, joined with ` | ` to stay on one line.
pub(crate) fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

#[allow(unsafe_code)]
fn set_parent_death_signal(command: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs in the forked child before exec and only calls
    // prctl(2), which is async-signal-safe and touches no memory of ours. It
    // runs after the uid change, which would otherwise clear the setting.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[allow(unsafe_code)]
pub(crate) fn send_signal(pid: u32, signal: i32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers; a stale pid at worst gets ESRCH.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// A port on 127.0.0.1 that was free a moment ago. The caller retries with a
/// new one if a server loses the race for it.
pub(crate) fn free_port() -> Result<u16, ServerError> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| ServerError::Io {
            context: "cannot find a free port".into(),
            source,
        })?;
    listener
        .local_addr()
        .map(|addr| addr.port())
        .map_err(|source| ServerError::Io {
            context: "cannot find a free port".into(),
            source,
        })
}

/// Where a server keeps its data: a temporary directory removed with the
/// handle (tests), or a kept one reused across runs (a local stack).
#[derive(Debug)]
pub(crate) enum Workdir {
    Temporary(tempfile::TempDir),
    Kept(PathBuf),
}

impl Workdir {
    pub(crate) fn path(&self) -> &Path {
        match self {
            Self::Temporary(dir) => dir.path(),
            Self::Kept(dir) => dir,
        }
    }

    /// A kept directory, created if missing.
    pub(crate) fn kept(dir: &Path) -> Result<Self, ServerError> {
        std::fs::create_dir_all(dir).map_err(|source| ServerError::Io {
            context: format!("cannot create {}", dir.display()),
            source,
        })?;
        Ok(Self::Kept(dir.to_path_buf()))
    }
}
