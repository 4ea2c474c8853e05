//! The payment service: one wallet per user (`shop.payment.v1.PaymentService`).
//!
//! - consumes `user.created` (open the wallet), `inventory.reserved` (debit),
//!   `order.cancelled` (refund a capture);
//! - emits `payment.completed`, `payment.failed`, `payment.refunded`.
//!
//! Its database schema lives in `migrations/payment/`, embedded here as
//! [`MIGRATIONS`] for `shop_db::migrate`.

use diesel_migrations::{EmbeddedMigrations, embed_migrations};

/// The service's schema, from `migrations/payment/`.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/payment");
