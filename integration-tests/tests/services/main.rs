//! The four services in one process against a real NATS and PostgreSQL
//! (the harness: `shop_integration_tests::shop`), one module per behaviour.

#![allow(clippy::unwrap_used)]

mod access;
mod db_roles;
mod degraded;
mod fuzz_edge;
mod identities;
mod operator;
mod probes;
mod saga;
mod schemas;
mod stack_traces;
mod tls;
