//! The order service: takes orders (`shop.order.v1.OrderService`) and
//! follows each saga.
//!
//! - consumes `user.created` (remember the user), `payment.completed`
//!   (confirm), `inventory.rejected` and `payment.failed` (cancel);
//! - emits `order.placed`, `order.confirmed`, `order.cancelled` (also when a
//!   PENDING order passes its deadline).
//!
//! Its database schema lives in `migrations/order/`, embedded here as
//! [`MIGRATIONS`] for `shop_db::migrate`.

use diesel_migrations::{EmbeddedMigrations, embed_migrations};

/// The service's schema, from `migrations/order/`.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/order");
