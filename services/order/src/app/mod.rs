//! The order service's use cases and saga steps, one file each, deciding
//! with [`crate::domain`] and storing with [`crate::store`]:
//!
//! | file | step | what |
//! |---|---|---|
//! | `place.rs` | 1 | PlaceOrder: a PENDING order and `order.placed`, one statement |
//! | `read.rs` | - | GetOrder, ListOrders |
//! | `advance.rs` | `user.created`, the confirmation, the cancellation | remember a user; confirm or cancel an order as its events say |
//! | `deadline.rs` | t | the sweeper that cancels PENDING orders past their deadline |

mod advance;
mod deadline;
mod place;
mod read;
#[cfg(test)]
mod tests;

use std::time::Duration;

use chrono::{DateTime, Utc};
use pg_jetstream::Outbox;
use pg_jetstream::db::PgPool;
use shop_service::ApiError;
use uuid::Uuid;

pub(crate) use self::advance::{
    EndEvent, StepEvent, StepOutcome, advance, learn_user, write_advance,
};
use crate::domain::Status;
use crate::metrics::SagaMetrics;
use crate::store::{OrderRow, Step};

/// An order with its lines and saga steps.
#[derive(Debug, Clone)]
pub(crate) struct Order {
    pub(crate) order_id: Uuid,
    pub(crate) user_id: Uuid,
    pub(crate) status: Status,
    pub(crate) total_cents: i64,
    pub(crate) cancel_reason: String,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) updated_at: DateTime<Utc>,
    pub(crate) items: Vec<(String, i32)>,
    pub(crate) steps: Vec<Step>,
}

impl Order {
    /// An order as stored; a status this version does not know is an
    /// error, never shown as something else.
    fn new(row: OrderRow, items: Vec<(String, i32)>, steps: Vec<Step>) -> Result<Self, ApiError> {
        Ok(Self {
            order_id: row.order_id,
            user_id: row.user_id,
            status: Status::parse(&row.status)?,
            total_cents: row.total_cents,
            cancel_reason: row.cancel_reason,
            created_at: row.created_at,
            updated_at: row.updated_at,
            items,
            steps,
        })
    }
}

/// The order use cases.
#[derive(Clone)]
pub(crate) struct Orders {
    pool: PgPool,
    outbox: Outbox,
    deadline: Duration,
    metrics: SagaMetrics,
}

impl Orders {
    pub(crate) fn new(
        pool: PgPool,
        outbox: Outbox,
        deadline: Duration,
        metrics: SagaMetrics,
    ) -> Self {
        Self {
            pool,
            outbox,
            deadline,
            metrics,
        }
    }
}
