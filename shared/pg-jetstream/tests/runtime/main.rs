//! The messaging runtime against real NATS and PostgreSQL, one module per
//! part: the outbox's publish after commit and the relay's sweep, the
//! consumer (batches, locks, retries, dead letters, redeliveries, a deleted
//! durable), provisioning, decoding, traces; `common` is their harness.

#![allow(clippy::unwrap_used)]

mod builder;
mod common;
mod consumer;
mod contention;
mod dead_letters;
mod decoding;
mod durable;
mod events;
mod example;
mod provision;
mod publish;
mod redeliveries;
mod relay;
mod stalls;
mod statement;
mod trace;
