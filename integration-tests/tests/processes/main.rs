//! The real service binaries as OS processes, each on free ports of its own
//! (the harness: `shop_integration_tests::processes`), one module per
//! behaviour.

#![allow(clippy::unwrap_used)]

mod chaos;
mod cluster;
mod nats_permissions;
mod shutdown;
mod telemetry;
