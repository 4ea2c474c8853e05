//! The gRPC adapter.

use prost::Message as _;
use shop_proto::order::v1 as pb;
use shop_proto::order::v1::order_service_server::{OrderService, OrderServiceServer};
use shop_service::{caller_of, page_after, page_size, parse_uuid, timestamp};
use tonic::{Request, Response, Status};

use crate::app::{Order, Orders};
use crate::domain;

/// The most bytes of orders in one `ListOrders` reply: under the 4 MiB a
/// gRPC client accepts by default, whatever the orders hold (a page of
/// 1,000 orders of 100 lines each would be many times that).
const MAX_PAGE_BYTES: usize = 3 * 1024 * 1024;

pub(crate) struct OrderApi {
    orders: Orders,
}

impl OrderApi {
    pub(crate) fn new(orders: Orders) -> Self {
        Self { orders }
    }

    pub(crate) fn into_server(self) -> OrderServiceServer<Self> {
        OrderServiceServer::new(self)
            .max_decoding_message_size(shop_service::limits::MAX_REQUEST_BYTES)
    }
}

impl From<Order> for pb::Order {
    fn from(order: Order) -> Self {
        let status = match order.status {
            domain::Status::Pending => pb::OrderStatus::Pending,
            domain::Status::Confirmed => pb::OrderStatus::Confirmed,
            domain::Status::Cancelled => pb::OrderStatus::Cancelled,
        };
        Self {
            order_id: order.order_id.to_string(),
            user_id: order.user_id.to_string(),
            items: order
                .items
                .into_iter()
                .map(|(sku, quantity)| pb::OrderItem { sku, quantity })
                .collect(),
            status: status.into(),
            total_cents: order.total_cents,
            cancel_reason: order.cancel_reason,
            steps: order
                .steps
                .into_iter()
                .map(|step| pb::SagaStep {
                    name: step.name,
                    detail: step.detail,
                    occurred_at: Some(timestamp(step.occurred_at)),
                })
                .collect(),
            created_at: Some(timestamp(order.created_at)),
            updated_at: Some(timestamp(order.updated_at)),
        }
    }
}

#[tonic::async_trait]
impl OrderService for OrderApi {
    async fn place_order(
        &self,
        request: Request<pb::PlaceOrderRequest>,
    ) -> Result<Response<pb::PlaceOrderResponse>, Status> {
        let caller = caller_of(&request)?;
        let r = request.into_inner();
        let user_id = parse_uuid("user_id", &r.user_id)?;
        let items: Vec<(String, i32)> = r
            .items
            .into_iter()
            .map(|item| (item.sku, item.quantity))
            .collect();
        let order = self
            .orders
            .place_order(&caller, user_id, &items, &r.idempotency_key)
            .await?;
        // The request's server span: its log lines and trace name the order.
        tracing::Span::current().record("order_id", order.order_id.to_string());
        Ok(Response::new(pb::PlaceOrderResponse {
            order: Some(order.into()),
        }))
    }

    async fn get_order(
        &self,
        request: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::GetOrderResponse>, Status> {
        let caller = caller_of(&request)?;
        let order_id = parse_uuid("order_id", &request.get_ref().order_id)?;
        let order = self.orders.get_order(&caller, order_id).await?;
        Ok(Response::new(pb::GetOrderResponse {
            order: Some(order.into()),
        }))
    }

    async fn list_orders(
        &self,
        request: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersResponse>, Status> {
        let caller = caller_of(&request)?;
        let r = request.into_inner();
        let user_id = parse_uuid("user_id", &r.user_id)?;
        let limit = page_size(r.page_size)?;
        let after = page_after(&r.page_token)?;
        let orders = self
            .orders
            .list_orders(&caller, user_id, after, limit)
            .await?;
        let fetched = orders.len();
        // Whole orders up to the reply's byte budget; the rest come on the
        // next page.
        let mut page = Vec::with_capacity(fetched);
        let mut bytes = 0;
        for order in orders {
            let order = pb::Order::from(order);
            // The field's tag and length prefix: a few bytes more.
            let size = order.encoded_len() + 8;
            if !page.is_empty() && bytes + size > MAX_PAGE_BYTES {
                break;
            }
            bytes += size;
            page.push(order);
        }
        let more = page.len() < fetched || fetched as i64 == limit;
        let next_page_token = match page.last() {
            Some(last) if more => last.order_id.clone(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListOrdersResponse {
            orders: page,
            next_page_token,
        }))
    }
}
