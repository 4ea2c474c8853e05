//! How `shopctl` reaches NATS.

use anyhow::Context as _;

/// Where NATS is, for the commands that read it.
#[derive(Debug, Clone, clap::Args)]
pub struct NatsArgs {
    /// NATS server URL, or every node of a cluster, comma-separated.
    #[arg(
        long = "nats",
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,
    /// A NATS credentials file, where the server requires one.
    #[arg(long = "nats-creds", env = "NATS_CREDS")]
    pub nats_creds: Option<std::path::PathBuf>,
    /// A NATS user, with `--nats-password`, where the server requires one.
    #[arg(long = "nats-user", env = "NATS_USER", requires = "nats_password")]
    pub nats_user: Option<String>,
    /// The password of `--nats-user`.
    #[arg(long = "nats-password", env = "NATS_PASSWORD", hide_env_values = true, value_parser = secret)]
    pub nats_password: Option<secrecy::SecretString>,
}

fn secret(value: &str) -> Result<secrecy::SecretString, std::convert::Infallible> {
    Ok(secrecy::SecretString::from(value))
}

impl NatsArgs {
    /// Connects, with the credentials when there are some.
    pub async fn connect(&self) -> anyhow::Result<async_nats::Client> {
        let mut options = async_nats::ConnectOptions::new().name("shopctl");
        if let Some(creds) = &self.nats_creds {
            options = options
                .credentials_file(creds)
                .await
                .with_context(|| format!("reading the NATS credentials {}", creds.display()))?;
        }
        if let (Some(user), Some(password)) = (&self.nats_user, &self.nats_password) {
            options = options.user_and_password(
                user.clone(),
                secrecy::ExposeSecret::expose_secret(password).to_owned(),
            );
        }
        let servers = pg_jetstream::provision::nats_servers(&self.nats_url)
            .with_context(|| format!("reading the NATS URL {}", self.nats_url))?;
        options.connect(servers).await.with_context(|| {
            format!(
                "cannot reach NATS at {}: is the stack up (scripts/shopctl up)?",
                self.nats_url
            )
        })
    }
}

/// Creates or updates the streams every service shares, `DLQ` and `REPLAY`:
/// an operator's step, since no service may administer them.
pub async fn provision_shared(
    client: async_nats::Client,
    replicas: usize,
) -> anyhow::Result<Vec<String>> {
    let js = async_nats::jetstream::new(client);
    let mut made = Vec::new();
    for spec in [
        pg_jetstream::provision::StreamSpec::dead_letters(),
        pg_jetstream::provision::StreamSpec::replays(),
    ] {
        let spec = spec.with_replicas(replicas);
        spec.provision(&js)
            .await
            .with_context(|| format!("creating or updating the {} stream", spec.name))?;
        made.push(spec.name);
    }
    Ok(made)
}
