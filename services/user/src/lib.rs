//! The user service: registers customers (`shop.user.v1.UserService`) and
//! publishes `user.created`, which the order and payment services consume.
//!
//! Its database schema lives in `migrations/user/`, embedded here as
//! [`MIGRATIONS`] for `shop_db::migrate`.

use diesel_migrations::{EmbeddedMigrations, embed_migrations};

/// The service's schema, from `migrations/user/`.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/user");
