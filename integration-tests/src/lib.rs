//! Tests of the services together, against a real `nats-server -js` and a
//! real PostgreSQL started by `shop-test-support`.
//!
//! This library is their harness; the tests are two binaries of modules,
//! one per behaviour:
//! - `tests/services/`: the four services in one process ([`shop`]):
//!   the saga, access, the edge under fuzzing, degraded dependencies,
//!   probes, TLS, the operator's commands, the files that repeat a
//!   service's identity, the database roles, the stored schemas, traces;
//! - `tests/processes/`: the real service binaries as OS processes
//!   ([`processes`]): chaos on one node and on a cluster, NATS permissions,
//!   shutdown under load, traces collected over OTLP ([`collector`]).

// A harness fails its test by panicking, with the value that was not there.
#![allow(clippy::unwrap_used, missing_debug_implementations)]

pub mod collector;
pub mod processes;
pub mod shop;
