//! PlaceOrder, the saga's start.

use chrono::{SubsecRound as _, Utc};
use pg_jetstream::envelope::OutgoingEvent;
use shop_proto::order::v1::{OrderItem, OrderPlaced};
use shop_service::{ApiError, Caller, timestamp};
use tracing::Instrument as _;
use uuid::Uuid;

use super::{Order, Orders};
use crate::domain::{OrderLines, Status};
use crate::store::{self, Placement, Step};

enum PlaceError {
    UnknownUser,
    /// The user placed an order with this idempotency key before.
    KeyTaken,
    Database(diesel::result::Error),
}

impl Orders {
    /// The saga's start: a PENDING order and `order.placed`, in one transaction.
    /// The same user, idempotency key and items return the first order;
    /// the same key with other items is FAILED_PRECONDITION.
    pub(crate) async fn place_order(
        &self,
        caller: &Caller,
        user_id: Uuid,
        items: &[(String, i32)],
        idempotency_key: &str,
    ) -> Result<Order, ApiError> {
        caller.require_user(user_id)?;
        let lines = OrderLines::parse(items).map_err(ApiError::InvalidArgument)?;
        let key =
            shop_domain::idempotency_key(idempotency_key).map_err(ApiError::InvalidArgument)?;
        let mut conn = self.pool.get().await?;
        let order_id = Uuid::now_v7();
        // What PostgreSQL keeps, so that the reply equals a later GetOrder.
        let now = Utc::now().trunc_subsecs(6);
        let deadline = now + self.deadline;
        let event = OrderPlaced {
            order_id: order_id.to_string(),
            user_id: user_id.to_string(),
            items: lines
                .lines()
                .iter()
                .map(|(sku, quantity)| OrderItem {
                    sku: sku.clone(),
                    quantity: *quantity,
                })
                .collect(),
            placed_at: Some(timestamp(now)),
            deadline: Some(timestamp(deadline)),
        };
        let events = self.outbox.write_in_statement(vec![
            OutgoingEvent::new(&event).correlated(order_id.to_string()),
        ]);
        let placed = store::place_order(
            &mut conn,
            user_id,
            order_id,
            key.as_deref(),
            deadline,
            now,
            lines.lines(),
            &events,
        )
        .instrument(events.span().clone())
        .await;
        let result = match placed {
            Ok(Placement { known: false, .. }) => Err(PlaceError::UnknownUser),
            Ok(Placement { placed: false, .. }) => Err(PlaceError::KeyTaken),
            Ok(Placement { .. }) => {
                // The reply does not wait for the broker: with NATS down the
                // shop still takes orders, and the sweep publishes them.
                self.outbox.publish_in_background(events.written());
                Ok(())
            }
            Err(error) => Err(PlaceError::Database(error)),
        };
        // Back to the pool before reading anything else: holding one
        // connection while waiting for another can exhaust the pool.
        drop(conn);
        match result {
            // The order as this transaction wrote it: later steps of its saga
            // may have begun already, and GetOrder shows them.
            Ok(()) => {
                let mut items = lines.lines().to_vec();
                items.sort();
                Ok(Order {
                    order_id,
                    user_id,
                    status: Status::Pending,
                    total_cents: 0,
                    cancel_reason: String::new(),
                    created_at: now,
                    updated_at: now,
                    items,
                    steps: vec![Step {
                        name: store::PLACED.to_owned(),
                        detail: String::new(),
                        occurred_at: now,
                    }],
                })
            }
            Err(PlaceError::UnknownUser) => Err(ApiError::FailedPrecondition(format!(
                "unknown user {user_id}: create the user first (a new user is known to the order service moments after CreateUser)"
            ))),
            // The first order with this key is the answer.
            Err(PlaceError::KeyTaken) => {
                let mut conn = self.pool.get().await?;
                let existing = match key.as_deref() {
                    Some(key) => store::order_by_key(&mut conn, user_id, key).await?,
                    None => None,
                };
                drop(conn);
                match existing {
                    Some(existing) => {
                        let first = self.load_order(existing).await?;
                        // The key names one request: the same key for other
                        // items is a client's bug, not a retry.
                        let mut wanted = lines.lines().to_vec();
                        wanted.sort();
                        if first.items != wanted {
                            return Err(ApiError::FailedPrecondition(format!(
                                "idempotency_key {:?} was used for another order ({}) with other items: use a new key for a new order",
                                key.as_deref().unwrap_or_default(),
                                first.order_id
                            )));
                        }
                        Ok(first)
                    }
                    // Orders are never deleted.
                    None => Err(ApiError::Internal(format!(
                        "idempotency key {key:?} of user {user_id} is taken by no order"
                    ))),
                }
            }
            Err(PlaceError::Database(error)) => Err(error.into()),
        }
    }
}
