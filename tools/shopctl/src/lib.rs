//! What `shopctl`'s commands share, and what tests read through them.
//!
//! - [`client_tls`]: how `shopctl` reaches services that serve TLS.
//! - [`nats`]: how `shopctl` reaches NATS.
//! - [`events`]: events as people read them.
//! - [`timeline`]: one saga's events and dead letters, read from the streams.

pub mod client_tls;
pub mod events;
pub mod nats;
pub mod timeline;
