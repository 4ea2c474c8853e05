//! The inventory service: the catalogue and the stock
//! (`shop.inventory.v1.InventoryService`).
//!
//! - consumes `order.placed` (reserve all lines or none), `order.confirmed`
//!   (reserved becomes sold), `payment.failed` and `order.cancelled` (release);
//! - emits `inventory.reserved`, `inventory.rejected`, `inventory.released`.
//!
//! Its database schema lives in `migrations/inventory/`, embedded here as
//! [`MIGRATIONS`] for `shop_db::migrate`.

use diesel_migrations::{EmbeddedMigrations, embed_migrations};

/// The service's schema, from `migrations/inventory/`.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/inventory");
