//! Tests of the services together, against a real `nats-server -js` and a
//! real PostgreSQL started by `shop-test-support`; see `tests/`.
