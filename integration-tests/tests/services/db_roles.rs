//! A service's runtime role on PostgreSQL: it reads and writes its rows and
//! can change nothing else. The owner migrates (the deployment's step); the
//! service, started as the runtime role, only checks the migrations, and
//! the schema and the constraints behind the invariants are out of its
//! reach.

use diesel_async::{AsyncConnection as _, AsyncPgConnection, SimpleAsyncConnection as _};
use shop_proto::inventory::v1::CreateProductRequest;
use shop_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use shop_service::{Migrations, Running, ServiceConfig};
use shop_test_support::TestInfra;

async fn as_role(infra: &TestInfra, role: &str, database: &str) -> AsyncPgConnection {
    AsyncPgConnection::establish(&infra.postgres.local_url(role, database))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_runtime_role_writes_rows_and_cannot_touch_the_schema() {
    let infra = TestInfra::start().await;
    let mut admin = AsyncPgConnection::establish(&infra.postgres.url("postgres"))
        .await
        .unwrap();
    for statement in [
        "CREATE ROLE inv_owner LOGIN",
        "CREATE ROLE inv LOGIN",
        "CREATE DATABASE shop_inventory OWNER inv_owner",
        "REVOKE ALL ON DATABASE shop_inventory FROM PUBLIC",
        "GRANT CONNECT ON DATABASE shop_inventory TO inv",
    ] {
        admin.batch_execute(statement).await.unwrap();
    }
    let owner_url = infra.postgres.local_url("inv_owner", "shop_inventory");
    let url = infra.postgres.local_url("inv", "shop_inventory");
    let runtime = |url: &str| ServiceConfig {
        migrations: Migrations::Check,
        ..ServiceConfig::local(url, infra.nats.url(), infra.issuer.auth_config())
    };

    // Before the migration step the service refuses to start, and says why.
    let refused = shop_inventory::build(shop_inventory::Config {
        service: runtime(&url),
    })
    .await
    .unwrap_err();
    let refused = format!("{refused:#}");
    assert!(refused.contains("--migrate-only"), "{refused}");
    // Nor could it migrate by itself.
    let migrating = shop_inventory::build(shop_inventory::Config {
        service: ServiceConfig::local(&url, infra.nats.url(), infra.issuer.auth_config()),
    })
    .await
    .unwrap_err();
    assert!(
        format!("{migrating:#}").contains("permission denied"),
        "{migrating:#}"
    );

    let step = ServiceConfig {
        migrate_only: true,
        grant_to: Some("inv".into()),
        ..ServiceConfig::local(&owner_url, infra.nats.url(), infra.issuer.auth_config())
    };
    shop_service::migrate_only(&step, shop_inventory::MIGRATIONS)
        .await
        .unwrap();
    // Twice is harmless: a step that runs on every deployment.
    shop_service::migrate_only(&step, shop_inventory::MIGRATIONS)
        .await
        .unwrap();

    let running = Running::spawn(
        shop_inventory::build(shop_inventory::Config {
            service: runtime(&url),
        })
        .await
        .unwrap(),
    );
    let mut inventory = InventoryServiceClient::new(shop_auth::with_token(
        running.channel().await.unwrap(),
        &infra.issuer.admin_token(),
    ));
    inventory
        .create_product(CreateProductRequest {
            sku: "LAMP".into(),
            name: "Lamp".into(),
            price_cents: 1999,
            stock: 3,
        })
        .await
        .unwrap();

    let mut conn = as_role(&infra, "inv", "shop_inventory").await;
    for statement in [
        "ALTER TABLE products DROP CONSTRAINT products_check",
        "ALTER TABLE products ADD COLUMN discount BIGINT",
        "DROP TABLE products",
        "TRUNCATE outbox",
        "CREATE TABLE stash (x INT)",
        "CREATE FUNCTION f() RETURNS INT LANGUAGE sql AS 'SELECT 1'",
        "DELETE FROM __diesel_schema_migrations",
        "CREATE INDEX ON products (name)",
    ] {
        let error = conn.batch_execute(statement).await.unwrap_err().to_string();
        assert!(
            error.contains("permission denied") || error.contains("must be owner"),
            "{statement}: {error}"
        );
    }
    // The rows are the service's, and the invariants' checks still hold.
    conn.batch_execute("UPDATE products SET name = 'Desk lamp' WHERE sku = 'LAMP'")
        .await
        .unwrap();
    let broken = conn
        .batch_execute("UPDATE products SET available = available + 1 WHERE sku = 'LAMP'")
        .await
        .unwrap_err()
        .to_string();
    assert!(broken.contains("violates check constraint"), "{broken}");
    running.stop().await.unwrap();
}
