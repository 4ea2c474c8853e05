//! `shopctl`: the operator CLI.
//!
//! - `up`: the whole system on this machine, without Docker: nats-server
//!   with JetStream and a PostgreSQL cluster (data under `.shop/`, reused
//!   between runs; `--fresh` wipes it), one database and one role per
//!   service, and the four services on the design's ports, until Ctrl-C.
//! - `bench`: against a running stack, N orders at a concurrency or a fixed
//!   rate; sagas/s and the latency from `PlaceOrder` to the terminal event.
//! - `demo`: against a running stack, one saga that is confirmed, one
//!   rejected for stock and one whose payment fails, with their timelines.
//! - `saga`: one saga's timeline across the services, read from the
//!   streams, dead letters included.
//! - `dlq`: list, show, replay (to the consumer that gave up only) and
//!   purge dead letters.
//! - `token`: a token signed with the local key `up` made, for grpcurl;
//!   `keygen` makes such a key elsewhere (compose does).
//! - `provision`: the shared `DLQ` and `REPLAY` streams, which only the
//!   operator may administer.
//! - `probe`: a service's `grpc.health.v1` status as an exit code, for
//!   container health checks.

#![allow(clippy::print_stdout)] // a CLI talks on stdout

mod bench;
mod credentials;
mod demo;
mod dlq;
mod probe;
mod saga;
mod token;
mod up;

use clap::Parser as _;

#[derive(Debug, clap::Parser)]
#[command(name = "shopctl", about = "Run and operate the shop")]
enum Command {
    /// Start NATS, PostgreSQL and the four services locally; Ctrl-C stops all.
    Up(up::Up),
    /// Run one saga of each kind against a running stack and show how each went.
    Demo(demo::Demo),
    /// Place many orders against a running stack and report sagas/s and latency.
    Bench(bench::Bench),
    /// Show one saga's events across the services, and its dead letters.
    Saga(saga::Saga),
    /// List, show, replay or purge dead letters.
    Dlq(dlq::Dlq),
    /// Make the local signing key if there is none, and write its public keys (JWKS).
    Keygen(token::Keygen),
    /// Print a token signed with the local key (for grpcurl's `-H "authorization: Bearer $TOKEN"`).
    Token(token::Token),
    /// Create or update the shared DLQ and REPLAY streams (the operator's step before the services start).
    Provision(Provision),
    /// Exit 0 when a service reports SERVING on grpc.health.v1 (for health checks).
    Probe(probe::Probe),
}

/// Options of `shopctl provision`.
#[derive(Debug, clap::Args)]
struct Provision {
    /// NATS, with the operator's credentials.
    #[command(flatten)]
    nats: shopctl::nats::NatsArgs,
    /// Replicas of each stream (3 on a three-node cluster).
    #[arg(long, env = "STREAM_REPLICAS", default_value_t = 1)]
    stream_replicas: usize,
}

impl Provision {
    async fn run(self) -> anyhow::Result<()> {
        let client = self.nats.connect().await?;
        for stream in shopctl::nats::provision_shared(client, self.stream_replicas).await? {
            println!("{stream}: ready");
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Command::parse() {
        Command::Up(up) => Box::pin(up.run()).await,
        Command::Demo(demo) => demo.run().await,
        Command::Bench(bench) => bench.run().await,
        Command::Saga(saga) => saga.run().await,
        Command::Dlq(dlq) => dlq.run().await,
        Command::Token(token) => token.run(),
        Command::Keygen(keygen) => keygen.run(),
        Command::Provision(provision) => provision.run().await,
        Command::Probe(probe) => probe.run().await,
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::Command;

    #[test]
    fn the_command_line_is_consistent() {
        // Clap checks argument ids, requirements and defaults here, not at
        // compile time.
        Command::command().debug_assert();
    }
}
