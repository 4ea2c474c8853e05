//! `shopctl`: the operator CLI.
//!
//! - `up`: the whole system on this machine, without Docker: nats-server
//!   with JetStream and a PostgreSQL cluster (data under `.shop/`, reused
//!   between runs; `--fresh` wipes it), one database and one role per
//!   service, and the four services on the design's ports, until Ctrl-C.

#![allow(clippy::print_stdout)] // a CLI talks on stdout

mod up;

use clap::Parser as _;

#[derive(Debug, clap::Parser)]
#[command(name = "shopctl", about = "Run and operate the shop")]
enum Command {
    /// Start NATS, PostgreSQL and the four services locally; Ctrl-C stops all.
    Up(up::Up),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Command::parse() {
        Command::Up(up) => up.run().await,
    }
}
