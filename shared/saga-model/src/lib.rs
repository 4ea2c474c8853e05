//! The saga as a model: `tests/model/` drives the services' own decision
//! functions (their `domain` modules) through the interleavings the network
//! allows, with no NATS, no PostgreSQL and no harness. Nothing to link
//! against here.
