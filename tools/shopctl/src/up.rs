//! `shopctl up`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use diesel_async::{AsyncConnection as _, AsyncPgConnection, SimpleAsyncConnection as _};
use shop_servers::{Nats, NatsCluster, Postgres};
use shop_service::{Identity, Listeners, LogFormat, Ports, Running, Server, ServiceConfig};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tracing::Instrument as _;

/// Options of `shopctl up`.
#[derive(Debug, clap::Args)]
pub(crate) struct Up {
    /// Where NATS and PostgreSQL keep their data, reused between runs.
    #[arg(long, default_value = ".shop")]
    data_dir: PathBuf,
    /// Wipe the data directory first.
    #[arg(long)]
    fresh: bool,
    /// The NATS client port.
    #[arg(long, default_value_t = 4222)]
    nats_port: u16,
    /// The PostgreSQL port.
    #[arg(long, default_value_t = 55432)]
    postgres_port: u16,
    /// Serve NATS's monitoring endpoints (`/varz`, `/jsz`) on this port
    /// (the first node's, with `--cluster`).
    #[arg(long)]
    nats_monitor_port: Option<u16>,
    /// Run NATS as a three-node JetStream cluster (client ports
    /// `--nats-port` and the next two) with every stream replicated three
    /// times, as in production.
    #[arg(long)]
    cluster: bool,
    /// Replicas of every service (1 to 4), sharing its database and durable
    /// consumers as a deployment's do; replica `k` listens on the first's
    /// ports plus `100 * k` (the second order service on 50152, HTTP 9202).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=4))]
    replicas: u16,
    /// A PostgreSQL setting, `name=value` as `postgres -c` takes it (e.g.
    /// `shared_preload_libraries=pg_stat_statements`); repeatable.
    #[arg(long = "postgres-setting", value_name = "NAME=VALUE")]
    postgres_settings: Vec<String>,
    /// Log format of the services: `text` or `json`.
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
    /// The address the services listen on; loopback unless you mean to
    /// let other machines in (`0.0.0.0`).
    #[arg(long, default_value = "127.0.0.1")]
    listen: std::net::IpAddr,
    /// How the payment service takes payments: `wallet`, its own wallets;
    /// `simulator`, through a payment provider simulator started here on
    /// `--provider-port` (its ledger at `/_sim/ledger`), whose webhooks go
    /// to the payment service. The simulator declines charges above
    /// 100000 cents, as the wallets would.
    #[arg(long, value_enum, default_value = "wallet")]
    payment_provider: LocalProvider,
    /// The provider simulator's port.
    #[arg(long, default_value_t = 8099)]
    provider_port: u16,
    /// Faults for the provider simulator, as JSON (`provider-sim --help`
    /// names them), e.g. `{"timeout_after_charge_rate": 0.2}`.
    #[arg(long, default_value = "{}")]
    provider_faults: String,
}

/// Where `shopctl up`'s payments go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LocalProvider {
    Wallet,
    Simulator,
}

/// The provider simulator `shopctl up --payment-provider simulator` runs,
/// and what the payment service needs to use it.
struct LocalSimulator {
    settings: shop_payment::provider::ProviderConfig,
    /// The key this run made for it (a throwaway, printed for `curl`).
    api_key: String,
    _stop: tokio_util::sync::DropGuard,
}

impl Up {
    /// Starts the provider simulator on `--provider-port`, with a fresh key
    /// and webhook secret, its webhooks to the payment service's HTTP port.
    async fn start_simulator(&self) -> anyhow::Result<LocalSimulator> {
        let mut faults: shop_provider_sim::Faults =
            serde_json::from_str(&self.provider_faults).context("--provider-faults")?;
        faults.decline_above_cents.get_or_insert(STARTING_CREDIT);
        let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, self.provider_port))
            .await
            .with_context(|| {
                format!(
                    "port {} (the provider simulator) is taken: stop whatever listens there, or give --provider-port",
                    self.provider_port
                )
            })?;
        let api_key = format!("sk_local_{}", uuid::Uuid::new_v4().simple());
        let secret = format!("whsec_local_{}", uuid::Uuid::new_v4().simple());
        let stop = tokio_util::sync::CancellationToken::new();
        let simulator = shop_provider_sim::Simulator::new(
            shop_provider_sim::Config {
                api_key: api_key.clone(),
                webhook_url: Some(format!(
                    "http://127.0.0.1:{}/webhooks/provider",
                    shop_payment::SERVICE.ports.http
                )),
                webhook_secret: secret.clone(),
                seed: 1,
                faults,
            },
            stop.clone(),
        )
        .map_err(anyhow::Error::msg)
        .context("--provider-faults")?;
        let router = simulator.router();
        let stopped = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(stopped.cancelled_owned())
                .await
        });
        Ok(LocalSimulator {
            settings: shop_payment::provider::ProviderConfig {
                kind: shop_payment::provider::ProviderKind::Http,
                provider_url: Some(format!("http://127.0.0.1:{}", self.provider_port)),
                provider_api_key: Some(api_key.clone().into()),
                provider_webhook_secret: Some(secret.into()),
                ..shop_payment::provider::ProviderConfig::default()
            },
            api_key,
            _stop: stop.drop_guard(),
        })
    }
}

/// The credit `shopctl up` opens every wallet with.
const STARTING_CREDIT: i64 = 100_000;

/// The services with their default ports, in start order.
const SERVICES: [Identity; 4] = [
    shop_user::SERVICE,
    shop_order::SERVICE,
    shop_inventory::SERVICE,
    shop_payment::SERVICE,
];

impl Up {
    pub(crate) async fn run(self) -> anyhow::Result<()> {
        // Each service's spans under its own service.name, shopctl's own
        // under `shopctl`; flushed when the stack stops.
        let telemetry = shop_service::init_logs("shopctl", self.log_format);
        let shutdown = shop_service::shutdown_on_signal();
        if self.fresh && self.data_dir.exists() {
            std::fs::remove_dir_all(&self.data_dir)
                .with_context(|| format!("wiping {}", self.data_dir.display()))?;
        }
        // The services' ports first, held until each service takes its
        // own: a clear error before anything starts, and none of the
        // connections made meanwhile (to NATS, to PostgreSQL, between the
        // cluster's nodes) is given one as its local end.
        let claims = async {
            let mut listeners = Vec::new();
            for Identity {
                name: service,
                ports: Ports { grpc, http },
                ..
            } in SERVICES
            {
                for replica in 0..self.replicas {
                    let claim = |what: &'static str, port: u16| async move {
                        shop_servers::claim_port(
                            self.listen,
                            port + 100 * replica,
                            shop_servers::PORT_PATIENCE,
                        )
                        .await
                        .with_context(|| {
                            format!("the {service} service cannot take its {what} port")
                        })
                    };
                    listeners.push(Listeners::new(
                        claim("gRPC", grpc).await?,
                        claim("HTTP", http).await?,
                    ));
                }
            }
            anyhow::Ok(listeners)
        };
        let mut listeners = tokio::select! {
            claimed = claims => claimed?,
            () = shutdown.cancelled() => return Ok(()),
        }
        .into_iter();
        let started = Instant::now();
        let data_dir = std::path::absolute(&self.data_dir)?;
        let (nats_dir, postgres_dir) = (data_dir.join("nats"), data_dir.join("postgres"));
        // Autovacuum looks once a minute, PostgreSQL's default, not every
        // 5 s as in the tests' servers: each look starts a worker process
        // per database, which cost an idle stack about 1.2 % of a core.
        let postgres_settings: Vec<String> = std::iter::once("autovacuum_naptime=60s".to_owned())
            .chain(self.postgres_settings.iter().cloned())
            .collect();
        let nats = async {
            if self.cluster {
                // Its own stores: a single server's streams are not a
                // cluster's.
                NatsCluster::start_in(
                    &data_dir.join("nats-cluster"),
                    self.nats_port,
                    3,
                    self.nats_monitor_port,
                )
                .await
                .map(LocalNats::Cluster)
            } else {
                Nats::start_in(&nats_dir, self.nats_port, self.nats_monitor_port)
                    .await
                    .map(|nats| LocalNats::Single(Box::new(nats)))
            }
        };
        let (nats, postgres) = tokio::join!(
            nats,
            Postgres::start_in(&postgres_dir, self.postgres_port, &postgres_settings),
        );
        let (mut nats, mut postgres) = (nats?, postgres?);
        let stream_replicas = if self.cluster { 3 } else { 1 };
        let urls = create_databases(&postgres).await?;
        // The local identity provider: `shopctl token` signs with this key,
        // the services trust its public half (read again when it changes).
        let auth_dir = data_dir.join("auth");
        let issuer = shop_auth::LocalIssuer::load_or_create(&auth_dir)
            .with_context(|| format!("making the local signing key in {}", auth_dir.display()))?;
        let mut auth = issuer.auth_config();
        auth.jwks = None;
        auth.jwks_file = Some(shop_auth::LocalIssuer::jwks_path(&auth_dir));

        let simulator = match self.payment_provider {
            LocalProvider::Wallet => None,
            LocalProvider::Simulator => Some(self.start_simulator().await?),
        };
        let provider = simulator
            .as_ref()
            .map(|simulator| simulator.settings.clone())
            .unwrap_or_default();

        let mut running = Vec::new();
        let mut databases = Vec::new();
        for (identity, (owner_url, url)) in SERVICES.into_iter().zip(urls) {
            let (service, Ports { grpc, http }) = (identity.name, identity.ports);
            databases.push((service, url.clone()));
            // The migration step, as the schema's owner; the service then
            // runs as a role that can only read and write rows.
            let owner = ServiceConfig {
                migrate_only: true,
                grant_to: Some(format!("shop_{service}")),
                stream_replicas,
                ..ServiceConfig::local(owner_url, nats.url(), auth.clone())
            };
            shop_service::migrate_only(&owner, migrations(service))
                .instrument(span(service))
                .await
                .with_context(|| format!("migrating the {service} database"))?;
            for replica in 0..self.replicas {
                let (grpc, http) = (grpc + 100 * replica, http + 100 * replica);
                let config = ServiceConfig {
                    log_format: self.log_format,
                    grpc_addr: Some((self.listen, grpc).into()),
                    http_addr: Some((self.listen, http).into()),
                    listeners: listeners.next().context("a service's listeners")?,
                    migrations: shop_service::Migrations::Check,
                    stream_replicas,
                    ..ServiceConfig::local(url.clone(), nats.url(), auth.clone())
                };
                let server = build(service, config, &provider)
                    .instrument(span(service))
                    .await?;
                running.push((service, http, Running::spawn_in(server, span(service))));
            }
        }
        for (service, http, _) in &running {
            let host = if self.listen.is_unspecified() {
                std::net::IpAddr::from([127, 0, 0, 1])
            } else {
                self.listen
            };
            wait_ready(service, (host, *http).into()).await?;
        }
        print_banner(&nats.url(), postgres.port(), started.elapsed());
        if let Some(simulator) = &simulator {
            println!(
                "Payments go through the provider simulator on http://127.0.0.1:{}; its ledger:",
                self.provider_port
            );
            println!(
                "  curl -H \"authorization: Bearer {}\" http://127.0.0.1:{}/_sim/ledger\n",
                simulator.api_key, self.provider_port
            );
        }
        if self.cluster {
            println!("JetStream runs as a three-node cluster; every stream has three replicas.");
        }
        if self.replicas > 1 {
            println!(
                "Every service runs {} replicas, the next ones on the ports above plus 100, 200, ...",
                self.replicas
            );
        }
        if self.cluster || self.replicas > 1 {
            println!();
        }

        shutdown.cancelled().await;
        println!("stopping...");
        for (service, _, server) in running {
            server
                .stop()
                .await
                .with_context(|| format!("stopping {service}"))?;
        }
        if let Some(telemetry) = telemetry {
            telemetry.shutdown().await;
        }
        // The services drained into NATS and PostgreSQL, which are stopped
        // only now: what their outboxes still hold, the next start sends.
        let mut left = Vec::new();
        for (service, url) in &databases {
            match outbox_rows(url).await {
                Ok(0) => {}
                Ok(rows) => left.push(format!("{service} {rows}")),
                Err(error) => left.push(format!("{service} unknown ({error})")),
            }
        }
        if left.is_empty() {
            println!("outboxes empty");
        } else {
            tracing::warn!(left = %left.join(", "), "events left in the outboxes; the next start publishes them");
        }
        drop(simulator);
        nats.stop();
        postgres.stop();
        Ok(())
    }
}

/// How many events the outbox of `database_url` holds.
async fn outbox_rows(database_url: &str) -> anyhow::Result<i64> {
    use diesel_async::RunQueryDsl as _;
    #[derive(diesel::QueryableByName)]
    struct Rows {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        rows: i64,
    }
    let mut conn = AsyncPgConnection::establish(database_url).await?;
    Ok(diesel::sql_query("SELECT count(*) AS rows FROM outbox")
        .get_result::<Rows>(&mut conn)
        .await?
        .rows)
}

/// The stack's NATS: one server, or a three-node cluster.
enum LocalNats {
    Single(Box<Nats>),
    Cluster(NatsCluster),
}

impl LocalNats {
    /// Every server's URL, comma-separated.
    fn url(&self) -> String {
        match self {
            Self::Single(nats) => nats.url(),
            Self::Cluster(cluster) => cluster.urls(),
        }
    }

    fn stop(&mut self) {
        match self {
            Self::Single(nats) => nats.stop(),
            Self::Cluster(cluster) => cluster.stop(),
        }
    }
}

fn span(service: &str) -> tracing::Span {
    match service {
        "user" => tracing::info_span!("user"),
        "order" => tracing::info_span!("order"),
        "inventory" => tracing::info_span!("inventory"),
        _ => tracing::info_span!("payment"),
    }
}

fn migrations(service: &str) -> diesel_migrations::EmbeddedMigrations {
    match service {
        "user" => shop_user::MIGRATIONS,
        "order" => shop_order::MIGRATIONS,
        "inventory" => shop_inventory::MIGRATIONS,
        _ => shop_payment::MIGRATIONS,
    }
}

async fn build(
    service: &str,
    config: ServiceConfig,
    provider: &shop_payment::provider::ProviderConfig,
) -> anyhow::Result<Server> {
    match service {
        "user" => shop_user::build(shop_user::Config { service: config }).await,
        "order" => {
            shop_order::build(shop_order::Config {
                service: config,
                saga_deadline_ms: 30_000,
            })
            .await
        }
        "inventory" => shop_inventory::build(shop_inventory::Config { service: config }).await,
        _ => {
            shop_payment::build(shop_payment::Config {
                service: config,
                starting_credit_cents: STARTING_CREDIT,
                provider: provider.clone(),
            })
            .await
        }
    }
    .with_context(|| format!("starting the {service} service"))
}

/// One database per service, with two roles of its own that can connect to
/// no other database: `shop_<service>_owner` owns the schema and runs the
/// migrations, `shop_<service>` (the service's) reads and writes rows and
/// can change nothing else. Returns each service's (owner, runtime) URLs,
/// in `SERVICES` order.
async fn create_databases(postgres: &Postgres) -> anyhow::Result<Vec<(String, String)>> {
    let mut admin = AsyncPgConnection::establish(&postgres.url("postgres")).await?;
    let mut urls = Vec::new();
    for Identity { name: service, .. } in SERVICES {
        let name = format!("shop_{service}");
        let owner = format!("{name}_owner");
        admin
            .batch_execute(&format!(
                "DO $$ BEGIN
                   IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{owner}') THEN CREATE ROLE {owner} LOGIN; END IF;
                   IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{name}') THEN CREATE ROLE {name} LOGIN; END IF;
                 END $$;"
            ))
            .await?;
        // Kept from an earlier run: reuse it.
        if let Err(error) = admin
            .batch_execute(&format!("CREATE DATABASE {name} OWNER {owner}"))
            .await
            && !error.to_string().contains("already exists")
        {
            return Err(error).with_context(|| format!("creating database {name}"));
        }
        admin
            .batch_execute(&format!(
                "ALTER DATABASE {name} OWNER TO {owner};
                 REVOKE ALL ON DATABASE {name} FROM PUBLIC;
                 GRANT CONNECT ON DATABASE {name} TO {name};"
            ))
            .await?;
        // A data directory from before the roles were split: the service's
        // role owned its tables; hand them to the owner.
        let mut database = AsyncPgConnection::establish(&postgres.url(&name)).await?;
        database
            .batch_execute(&format!("REASSIGN OWNED BY {name} TO {owner}"))
            .await
            .with_context(|| format!("handing the tables of {name} to {owner}"))?;
        urls.push((
            postgres.local_url(&owner, &name),
            postgres.local_url(&name, &name),
        ));
    }
    Ok(urls)
}

/// Waits until the service's `/readyz` answers 200.
async fn wait_ready(service: &str, http: std::net::SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = async {
            let mut stream = tokio::net::TcpStream::connect(http).await.ok()?;
            stream
                .write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut response = String::new();
            stream.read_to_string(&mut response).await.ok()?;
            Some(response.starts_with("HTTP/1.1 200"))
        }
        .await
        .unwrap_or(false);
        if ready {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{service} did not become ready on {http}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn print_banner(nats_url: &str, postgres_port: u16, took: Duration) {
    println!();
    println!(
        "shop is up in {:.1} s: all four services SERVING",
        took.as_secs_f64()
    );
    println!();
    println!(
        "  gRPC   user localhost:50051  order localhost:50052  inventory localhost:50053  payment localhost:50054"
    );
    println!("  HTTP   /healthz /readyz on localhost:9101 to 9104");
    println!(
        "  NATS   {nats_url}      PostgreSQL 127.0.0.1:{postgres_port} (databases shop_user, shop_order, ...)"
    );
    println!();
    println!("Try (every call but health and reflection needs a token):");
    println!("  grpcurl -plaintext localhost:50052 list");
    println!("  TOKEN=$(scripts/shopctl token --admin)");
    println!(
        "  grpcurl -plaintext -H \"authorization: Bearer $TOKEN\" -d '{{\"email\":\"ann@example.com\",\"name\":\"Ann\"}}' localhost:50051 shop.user.v1.UserService/CreateUser"
    );
    println!(
        "  grpcurl -plaintext -H \"authorization: Bearer $TOKEN\" -d '{{\"sku\":\"LAMP\",\"name\":\"Desk lamp\",\"price_cents\":1999,\"stock\":10}}' localhost:50053 shop.inventory.v1.InventoryService/CreateProduct"
    );
    println!();
    println!("Ctrl-C stops everything.");
}
