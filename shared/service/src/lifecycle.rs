//! How a running service stops: one order, one deadline, whatever asked.
//!
//! A service stops when told to (SIGTERM, Ctrl-C) or when one of its
//! servers ends on its own (an error): either way everything stops, in this
//! order, so that nothing commits after the relay has gone:
//! 1. the gRPC server takes no new calls and lets the ones in hand finish
//!    (at most [`DRAIN`]), the HTTP server likewise;
//! 2. the tasks (consumers, sweepers) stop taking work and finish what they
//!    hold;
//! 3. the relay publishes what they committed and stops.
//!
//! All of it within [`SHUTDOWN_WITHIN`], below the chart's termination grace
//! period (40 s): past it, what is still running is abandoned, logged, and
//! left to JetStream's redelivery and the next start's sweep.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a stopping server waits for its open connections to finish.
pub const DRAIN: Duration = Duration::from_secs(10);

/// How long a service may take to stop, all steps together.
pub const SHUTDOWN_WITHIN: Duration = Duration::from_secs(30);

/// What a service runs, to be stopped in order.
pub(crate) struct Running<G, H, R> {
    /// Cancelled to stop everything; the servers and the tasks watch it.
    pub(crate) stop: CancellationToken,
    /// The gRPC server, ending once `stop` is cancelled and its calls are done.
    pub(crate) grpc: G,
    /// The HTTP server, likewise.
    pub(crate) http: H,
    /// The tasks, closed (nothing more is spawned on it).
    pub(crate) tasks: TaskTracker,
    /// Cancelled once the tasks are done: the relay drains and stops.
    pub(crate) relay_stop: CancellationToken,
    /// The relay, ending once it has drained.
    pub(crate) relay: R,
}

impl<G, H, R> Running<G, H, R>
where
    G: Future<Output = anyhow::Result<()>>,
    H: Future<Output = anyhow::Result<()>>,
    R: Future<Output = ()>,
{
    /// Serves until `stop` is cancelled or a server ends on its own, then
    /// stops everything in order within `within`; returns how serving ended.
    pub(crate) async fn serve(self, name: &str, within: Duration) -> anyhow::Result<()> {
        let Self {
            stop,
            grpc,
            http,
            tasks,
            relay_stop,
            relay,
        } = self;
        // Whatever happens to this future, the relay and the tasks stop.
        let _stop_all = (stop.clone().drop_guard(), relay_stop.clone().drop_guard());
        let (mut grpc, mut http) = (std::pin::pin!(grpc), std::pin::pin!(http));
        let (mut grpc_ended, mut http_ended) = (None, None);
        tokio::select! {
            () = stop.cancelled() => {}
            served = &mut grpc => grpc_ended = Some(served),
            served = &mut http => http_ended = Some(served),
        }
        if !stop.is_cancelled() {
            tracing::error!(
                service = name,
                "a server stopped on its own; stopping the rest"
            );
            stop.cancel();
        }
        let deadline = Instant::now() + within;
        let drained_by = (Instant::now() + DRAIN).min(deadline);
        let grpc = match grpc_ended {
            Some(served) => served,
            None => timeout_at(drained_by, grpc).await.unwrap_or_else(|_| {
                tracing::warn!(
                    service = name,
                    ?DRAIN,
                    "gRPC connections still open; closing them"
                );
                Ok(())
            }),
        };
        let http = match http_ended {
            Some(served) => served,
            None => timeout_at(drained_by, http).await.unwrap_or_else(|_| {
                tracing::warn!(service = name, "HTTP connections still open; closing them");
                Ok(())
            }),
        };
        if timeout_at(deadline, tasks.wait()).await.is_err() {
            tracing::error!(
                service = name,
                ?within,
                "tasks still running at the shutdown deadline; leaving them"
            );
        }
        relay_stop.cancel();
        if timeout_at(deadline, relay).await.is_err() {
            tracing::error!(
                service = name,
                ?within,
                "the relay still draining at the shutdown deadline; the next start's sweep publishes the rest"
            );
        }
        grpc.context("serving gRPC")?;
        http.context("serving HTTP")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A task that notes when it saw the stop and when it finished.
    fn task(
        stop: &CancellationToken,
        log: &Arc<Mutex<Vec<&'static str>>>,
    ) -> impl Future<Output = ()> + use<> {
        let (stop, log) = (stop.clone(), Arc::clone(log));
        async move {
            stop.cancelled().await;
            // Finishing what it holds.
            tokio::time::sleep(Duration::from_millis(50)).await;
            log.lock().unwrap().push("task done");
        }
    }

    #[tokio::test]
    async fn a_server_that_fails_stops_the_tasks_before_the_relay() {
        let stop = CancellationToken::new();
        let relay_stop = CancellationToken::new();
        let log = Arc::new(Mutex::new(Vec::new()));
        let tasks = TaskTracker::new();
        tasks.spawn(task(&stop, &log));
        tasks.close();
        let relay = {
            let (relay_stop, log) = (relay_stop.clone(), Arc::clone(&log));
            async move {
                relay_stop.cancelled().await;
                log.lock().unwrap().push("relay drained");
            }
        };
        let http = {
            let stop = stop.clone();
            async move {
                stop.cancelled().await;
                Ok(())
            }
        };
        let running = Running {
            stop: stop.clone(),
            grpc: async { Err(anyhow::anyhow!("the listener is gone")) },
            http,
            tasks,
            relay_stop,
            relay,
        };
        let error = running.serve("test", SHUTDOWN_WITHIN).await.unwrap_err();
        assert!(
            format!("{error:#}").contains("the listener is gone"),
            "{error:#}"
        );
        assert!(stop.is_cancelled());
        assert_eq!(*log.lock().unwrap(), ["task done", "relay drained"]);
    }

    #[tokio::test]
    async fn a_task_that_never_ends_holds_the_stop_only_until_the_deadline() {
        let stop = CancellationToken::new();
        let relay_stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(std::future::pending::<()>());
        tasks.close();
        let relay = {
            let relay_stop = relay_stop.clone();
            async move { relay_stop.cancelled().await }
        };
        let serve = |stop: CancellationToken| async move {
            stop.cancelled().await;
            Ok(())
        };
        let running = Running {
            stop: stop.clone(),
            grpc: serve(stop.clone()),
            http: serve(stop.clone()),
            tasks,
            relay_stop: relay_stop.clone(),
            relay,
        };
        stop.cancel();
        let started = std::time::Instant::now();
        running
            .serve("test", Duration::from_millis(200))
            .await
            .unwrap();
        assert!(relay_stop.is_cancelled(), "the relay was told to stop");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
}
