//! The inventory service alone, on free ports against a fresh database and
//! a real NATS server, with the producers' streams it reads and one
//! product, `LAMP` at 1999 cents.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use async_nats::jetstream;
use pg_jetstream::provision::StreamSpec;
use shop_proto::inventory::v1::CreateProductRequest;
use shop_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use shop_service::{Running, ServiceConfig};
use shop_test_support::TestInfra;

/// A started inventory service and what reaches it.
pub struct Started {
    pub infra: TestInfra,
    pub js: jetstream::Context,
    pub running: Running,
    /// A client that calls as the administrator.
    pub client: InventoryServiceClient<shop_auth::BearerChannel>,
}

/// Starts the service with `lamps` units of `LAMP` in stock.
pub async fn start(lamps: i64) -> Started {
    let infra = TestInfra::start().await;
    let url = infra.postgres.create_database("shop_inventory").await;
    let js = jetstream::new(infra.nats.client().await);
    // The producers' streams, as the order and payment services would make them.
    for (stream, prefix) in [("ORDER", "order"), ("PAYMENT", "payment")] {
        StreamSpec::new(stream, prefix)
            .provision(&js)
            .await
            .unwrap();
    }
    let config = shop_inventory::Config {
        service: ServiceConfig::local(url, infra.nats.url(), infra.issuer.auth_config()),
    };
    let running = Running::spawn(shop_inventory::build(config).await.unwrap());
    let mut client = InventoryServiceClient::new(shop_auth::with_token(
        running.channel().await.unwrap(),
        &infra.issuer.admin_token(),
    ));
    client
        .create_product(CreateProductRequest {
            sku: "LAMP".into(),
            name: "Lamp".into(),
            price_cents: 1999,
            stock: lamps,
        })
        .await
        .unwrap();
    Started {
        infra,
        js,
        running,
        client,
    }
}
