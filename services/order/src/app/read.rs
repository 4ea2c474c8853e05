//! The queries: one order, a user's orders.

use shop_service::{ApiError, Caller};
use uuid::Uuid;

use super::{Order, Orders};
use crate::store;

impl Orders {
    /// An order with its lines and steps: the caller's own, or anyone's for
    /// an administrator.
    pub(crate) async fn get_order(
        &self,
        caller: &Caller,
        order_id: Uuid,
    ) -> Result<Order, ApiError> {
        let order = self.load_order(order_id).await?;
        caller.require_user(order.user_id)?;
        Ok(order)
    }

    pub(super) async fn load_order(&self, order_id: Uuid) -> Result<Order, ApiError> {
        let mut conn = self.pool.get().await?;
        let row = store::order(&mut conn, order_id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no order {order_id}")))?;
        let items = store::items_of(&mut conn, order_id).await?;
        let steps = store::steps_of(&mut conn, order_id).await?;
        Order::new(row, items, steps)
    }

    /// A user's orders, newest first, after `after` (the last order of the
    /// previous page), in at most four statements whatever the page's size:
    /// the cursor, the orders, all their lines, all their steps.
    pub(crate) async fn list_orders(
        &self,
        caller: &Caller,
        user_id: Uuid,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<Order>, ApiError> {
        caller.require_user(user_id)?;
        let mut conn = self.pool.get().await?;
        let cursor = match after {
            None => None,
            Some(after) => {
                let placed_at = store::placed_at(&mut conn, user_id, after).await?.ok_or_else(|| {
                    ApiError::InvalidArgument(
                        "page_token names no order of this user: pass the next_page_token of the previous page".into(),
                    )
                })?;
                Some((placed_at, after))
            }
        };
        let rows = store::orders_page(&mut conn, user_id, cursor, limit).await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = rows.iter().map(|row| row.order_id).collect();
        let mut items_of = store::items_of_orders(&mut conn, &ids).await?;
        let mut steps_of = store::steps_of_orders(&mut conn, &ids).await?;
        rows.into_iter()
            .map(|row| {
                let items = items_of.remove(&row.order_id).unwrap_or_default();
                let steps = steps_of.remove(&row.order_id).unwrap_or_default();
                Order::new(row, items, steps)
            })
            .collect()
    }
}
