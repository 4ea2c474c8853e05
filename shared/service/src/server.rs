//! The gRPC and HTTP servers of a service and its background tasks, run
//! until shutdown (see `lifecycle` for the order they stop in).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Context as _;
use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Identity;
use crate::config::ServiceConfig;
use crate::infra::Infrastructure;
use crate::observe::{self, GrpcMetrics};
use crate::probes;
use crate::{SHUTDOWN_WITHIN, lifecycle, tls};

/// A background task: `run(shutdown)`.
pub type Task = Box<dyn FnOnce(CancellationToken) -> BoxFuture<'static, ()> + Send>;

/// A service ready to run: its listeners are bound, so its addresses are known
/// (port 0 picks a free port).
pub struct Server {
    name: &'static str,
    grpc: TcpListener,
    http: TcpListener,
    routes: tonic::service::Routes,
    health: tonic_health::server::HealthReporter,
    infra: Infrastructure,
    /// The outbox's relay, stopped last.
    relay: pg_jetstream::Task,
    tasks: Vec<Task>,
    services: Vec<&'static str>,
    tls: Option<tls::ServerTls>,
    /// Routes of the service's own on the HTTP port (a provider's webhooks).
    http_routes: axum::Router,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A service's default ports: gRPC 50051 user, 50052 order, 50053
/// inventory, 50054 payment; HTTP 9101 to 9104 likewise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// The gRPC port.
    pub grpc: u16,
    /// The HTTP port.
    pub http: u16,
}

/// A service's gRPC and HTTP listeners, bound by whoever starts it, handed
/// over once (a clone shares them): see [`ServiceConfig::listeners`].
#[derive(Debug, Clone, Default)]
pub struct Listeners(Arc<Mutex<Option<(std::net::TcpListener, std::net::TcpListener)>>>);

impl Listeners {
    /// The gRPC and the HTTP listener.
    pub fn new(grpc: std::net::TcpListener, http: std::net::TcpListener) -> Self {
        Self(Arc::new(Mutex::new(Some((grpc, http)))))
    }

    /// The listeners, as tokio's, if they are here and not taken yet.
    fn take(&self) -> anyhow::Result<Option<(TcpListener, TcpListener)>> {
        let taken = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        let Some((grpc, http)) = taken else {
            return Ok(None);
        };
        let tokio = |listener: std::net::TcpListener| {
            listener.set_nonblocking(true)?;
            TcpListener::from_std(listener)
        };
        Ok(Some((
            tokio(grpc).context("the gRPC listener")?,
            tokio(http).context("the HTTP listener")?,
        )))
    }
}

async fn listen(what: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen for {what} on {addr} (is another process using port {}?)",
            addr.port()
        )
    })
}

impl Server {
    /// Binds the listeners of `config` for the service `identity` names, on
    /// its default ports unless the configuration names addresses, or takes
    /// the ones it was handed ([`ServiceConfig::listeners`]).
    ///
    /// `messaging` is the service's messaging runtime, started
    /// ([`Infrastructure::messaging`]): its consumers run as the server's
    /// tasks, and its relay stops after everything else.
    pub async fn bind(
        identity: &Identity,
        config: &ServiceConfig,
        infra: Infrastructure,
        messaging: pg_jetstream::Messaging,
    ) -> anyhow::Result<Self> {
        let (name, ports) = (identity.name, identity.ports);
        let or_default = |addr: Option<SocketAddr>, port| {
            addr.unwrap_or((std::net::Ipv4Addr::UNSPECIFIED, port).into())
        };
        let (grpc, http) = match config.listeners.take()? {
            Some(listeners) => listeners,
            None => (
                listen("gRPC", or_default(config.grpc_addr, ports.grpc)).await?,
                listen("HTTP", or_default(config.http_addr, ports.http)).await?,
            ),
        };
        let tls = config
            .tls
            .server_tls()
            .context("loading the TLS certificate")?;
        let (health, health_service) = tonic_health::server::health_reporter();
        let routes = tonic::service::Routes::new(health_service);
        let (relay, consumers) = messaging.into_tasks();
        let mut tasks: Vec<Task> = Vec::new();
        for consumer in consumers {
            if let Some((durable, stream)) = consumer.consumer() {
                infra.probes.add_consumer(durable, stream);
            }
            tasks.push(Box::new(move |shutdown| Box::pin(consumer.run(shutdown))));
        }
        Ok(Self {
            name,
            grpc,
            http,
            routes,
            health,
            infra,
            relay,
            tasks,
            services: Vec::new(),
            tls,
            http_routes: axum::Router::new(),
        })
    }

    /// Adds a gRPC service, reported by `grpc.health.v1` and reflection
    /// under its full name (`shop.order.v1.OrderService`).
    #[must_use]
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: tower_service::Service<
                axum::http::Request<tonic::body::Body>,
                Response = axum::http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.routes = self.routes.add_service(service);
        self.services.push(S::NAME);
        self
    }

    /// Adds routes of the service's own to the HTTP port, beside the probes
    /// and the metrics.
    #[must_use]
    pub fn add_http_routes(mut self, routes: axum::Router) -> Self {
        self.http_routes = self.http_routes.merge(routes);
        self
    }

    /// Adds a background task, run until shutdown.
    #[must_use]
    pub fn add_task(mut self, task: Task) -> Self {
        self.tasks.push(task);
        self
    }

    /// The gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` is cancelled or a server ends on its own,
    /// then, in this order and within [`SHUTDOWN_WITHIN`]: stops taking
    /// requests and messages, lets the requests, batches and background
    /// tasks in hand finish, lets the relay publish what they committed,
    /// and returns (see `lifecycle`).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            name,
            grpc,
            http,
            routes,
            health,
            infra,
            relay,
            tasks,
            services,
            tls,
            http_routes,
        } = self;
        let routes = with_reflection(routes, &services)?;
        let methods = observe::served_methods(&services);
        // The relay stops last: it publishes what the requests and the
        // consumers commit while they finish, so a stopped service leaves
        // nothing in its outbox for the next start.
        let relay_stop = CancellationToken::new();
        let relay = tokio::spawn(relay.run(relay_stop.clone()));
        // Everything stops on `stop`: the caller's shutdown, or a server of
        // this service ending on its own (see `lifecycle`).
        let stop = shutdown.child_token();
        // Should this function return early (a bad TLS setting), nothing
        // it started keeps running.
        let _stop_guards = (stop.clone().drop_guard(), relay_stop.clone().drop_guard());
        let grpc_metrics = GrpcMetrics::default();
        infra.register_metrics(|registry| grpc_metrics.register(registry));
        let tracker = TaskTracker::new();
        for task in tasks {
            tracker.spawn(task(stop.clone()));
        }
        probes::report_starting(&health, &services).await;
        tracker.spawn(probes::watch_health(
            health,
            services,
            infra.clone(),
            stop.clone(),
        ));
        tracker.close();

        let verifier = infra.verifier.clone();
        let http = serve_http(
            http,
            tls.as_ref(),
            probes::http_app(Arc::new(infra)).merge(http_routes),
            &stop,
        )?;
        tracing::info!(service = name, grpc = %grpc.local_addr()?, tls = tls.is_some(), "serving");
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &tls {
            builder = builder
                .tls_config(tls.grpc.clone())
                .context("configuring gRPC TLS")?;
        }
        // Observed first, so that refused calls are counted and traced too.
        let grpc = builder
            .layer(observe::ObserveLayer {
                metrics: grpc_metrics,
                service: name,
                methods: Arc::new(methods),
            })
            .layer(shop_auth::AuthLayer::new(verifier))
            .add_routes(routes)
            .serve_with_incoming_shutdown(
                tokio_stream_listener(grpc),
                stop.clone().cancelled_owned(),
            );
        let relay = async move {
            if let Err(error) = relay.await {
                tracing::error!(service = name, %error, "the outbox relay task failed");
            }
        };
        // Boxed: the servers' futures are large.
        Box::pin(
            lifecycle::Running {
                stop,
                grpc: async move { Ok(grpc.await?) },
                http,
                tasks: tracker,
                relay_stop,
                relay,
            }
            .serve(name, SHUTDOWN_WITHIN),
        )
        .await?;
        tracing::info!(service = name, "stopped");
        Ok(())
    }
}

/// `routes` with server reflection naming only what this server serves.
/// Both versions: grpcurl before 1.9 speaks only v1alpha.
fn with_reflection(
    routes: tonic::service::Routes,
    services: &[&'static str],
) -> anyhow::Result<tonic::service::Routes> {
    let reflection = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(shop_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        for service in services {
            builder = builder.with_service_name(*service);
        }
        builder
    };
    Ok(routes
        .add_service(
            reflection()
                .build_v1()
                .context("building gRPC reflection")?,
        )
        .add_service(
            reflection()
                .build_v1alpha()
                .context("building gRPC reflection")?,
        ))
}

/// The HTTP server on `listener` (over TLS when given), until `stop`.
fn serve_http(
    listener: TcpListener,
    tls: Option<&tls::ServerTls>,
    app: axum::Router,
    stop: &CancellationToken,
) -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<()>> + use<>> {
    let stopped = stop.clone().cancelled_owned();
    let served = match tls {
        Some(tls) => {
            let listener = tls::TlsListener::new(listener, tls.http.clone(), stop.clone())?;
            tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopped)
                    .await
            })
        }
        None => tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await
        }),
    };
    Ok(async move { Ok(served.await.context("the HTTP server task")??) })
}

fn tokio_stream_listener(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| {
            let _ = stream.set_nodelay(true);
            stream
        });
        Some((accepted, listener))
    })
}
