//! The gRPC adapter.

use shop_proto::inventory::v1 as pb;
use shop_proto::inventory::v1::inventory_service_server::{
    InventoryService, InventoryServiceServer,
};
use shop_service::{caller_of, page_size};
use tonic::{Request, Response, Status};

use crate::app::Catalogue;
use crate::store::Product;

pub(crate) struct InventoryApi {
    catalogue: Catalogue,
}

impl InventoryApi {
    pub(crate) fn new(catalogue: Catalogue) -> Self {
        Self { catalogue }
    }

    pub(crate) fn into_server(self) -> InventoryServiceServer<Self> {
        InventoryServiceServer::new(self)
            .max_decoding_message_size(shop_service::limits::MAX_REQUEST_BYTES)
    }
}

impl From<Product> for pb::Product {
    fn from(product: Product) -> Self {
        Self {
            sku: product.sku,
            name: product.name,
            price_cents: product.price_cents,
            available: product.available,
            reserved: product.reserved,
            sold: product.sold,
        }
    }
}

#[tonic::async_trait]
impl InventoryService for InventoryApi {
    async fn create_product(
        &self,
        request: Request<pb::CreateProductRequest>,
    ) -> Result<Response<pb::CreateProductResponse>, Status> {
        let caller = caller_of(&request)?;
        let r = request.into_inner();
        let product = self
            .catalogue
            .create_product(&caller, &r.sku, &r.name, r.price_cents, r.stock)
            .await?;
        Ok(Response::new(pb::CreateProductResponse {
            product: Some(product.into()),
        }))
    }

    async fn get_product(
        &self,
        request: Request<pb::GetProductRequest>,
    ) -> Result<Response<pb::GetProductResponse>, Status> {
        let product = self.catalogue.get_product(&request.get_ref().sku).await?;
        Ok(Response::new(pb::GetProductResponse {
            product: Some(product.into()),
        }))
    }

    async fn add_stock(
        &self,
        request: Request<pb::AddStockRequest>,
    ) -> Result<Response<pb::AddStockResponse>, Status> {
        let caller = caller_of(&request)?;
        let r = request.into_inner();
        let product = self
            .catalogue
            .add_stock(&caller, &r.sku, r.quantity)
            .await?;
        Ok(Response::new(pb::AddStockResponse {
            product: Some(product.into()),
        }))
    }

    async fn list_products(
        &self,
        request: Request<pb::ListProductsRequest>,
    ) -> Result<Response<pb::ListProductsResponse>, Status> {
        let r = request.into_inner();
        let limit = page_size(r.page_size)?;
        let after = Some(r.page_token.as_str()).filter(|token| !token.is_empty());
        let products = self.catalogue.list_products(after, limit).await?;
        let next_page_token = if products.len() as i64 == limit {
            products.last().map(|p| p.sku.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListProductsResponse {
            products: products.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }
}
