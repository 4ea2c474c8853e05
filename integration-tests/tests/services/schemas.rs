//! Each service's schema, migrated into its own database of one cluster as a
//! deployment would, and the invariants its constraints enforce.

use diesel::sql_query;
use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl as _};
use diesel_migrations::EmbeddedMigrations;
use shop_test_support::TestPostgres;

const SERVICES: [&str; 4] = ["user", "order", "inventory", "payment"];

/// A service's embedded schema.
fn schema(service: &str) -> EmbeddedMigrations {
    match service {
        "user" => shop_user::MIGRATIONS,
        "order" => shop_order::MIGRATIONS,
        "inventory" => shop_inventory::MIGRATIONS,
        "payment" => shop_payment::MIGRATIONS,
        other => panic!("no service {other}"),
    }
}

async fn migrated(postgres: &TestPostgres, service: &str) -> AsyncPgConnection {
    let url = postgres.create_database(&format!("shop_{service}")).await;
    pg_jetstream::db::migrate(&url, vec![schema(service)])
        .await
        .expect("migrations apply");
    AsyncPgConnection::establish(&url)
        .await
        .expect("the migrated database accepts connections")
}

async fn fails(connection: &mut AsyncPgConnection, statement: &str) -> String {
    sql_query(statement)
        .execute(connection)
        .await
        .expect_err(statement)
        .to_string()
}

#[tokio::test]
async fn every_schema_migrates_once_into_its_own_database() {
    let postgres = TestPostgres::start().await;
    for service in SERVICES {
        let url = postgres.create_database(&format!("shop_{service}")).await;
        let applied = pg_jetstream::db::migrate(&url, vec![schema(service)])
            .await
            .unwrap();
        assert!(
            !applied.is_empty(),
            "{service}: nothing applied on a fresh database"
        );
        // A restart, or a second replica, finds nothing left to do.
        let again = pg_jetstream::db::migrate(&url, vec![schema(service)])
            .await
            .unwrap();
        assert!(again.is_empty(), "{service}: applied {again:?} twice");
    }
    // The databases are apart: the order service's database has no users table.
    let mut order = AsyncPgConnection::establish(&postgres.url("shop_order"))
        .await
        .unwrap();
    let error = fails(&mut order, "SELECT * FROM users").await;
    assert!(error.contains("does not exist"), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_migrating_at_once_apply_each_migration_once() {
    let postgres = TestPostgres::start().await;
    let url = postgres.create_database("shop_payment").await;
    let replicas: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(pg_jetstream::db::migrate(
                url.clone(),
                vec![shop_payment::MIGRATIONS],
            ))
        })
        .collect();
    let mut total = 0;
    for replica in replicas {
        total += replica.await.unwrap().unwrap().len();
    }
    let migrations =
        diesel::migration::MigrationSource::<diesel::pg::Pg>::migrations(&shop_payment::MIGRATIONS)
            .unwrap()
            .len();
    assert!(migrations > 1);
    assert_eq!(
        total, migrations,
        "the {migrations} payment migrations were applied {total} times in all"
    );
}

#[tokio::test]
async fn user_emails_are_unique_ignoring_case() {
    let postgres = TestPostgres::start().await;
    let mut db = migrated(&postgres, "user").await;
    sql_query("INSERT INTO users (user_id, email, email_key, name) VALUES (gen_random_uuid(), 'Ann@x.io', 'ann@x.io', 'Ann')")
        .execute(&mut db)
        .await
        .unwrap();
    let error = fails(
        &mut db,
        "INSERT INTO users (user_id, email, email_key, name) VALUES (gen_random_uuid(), 'ann@X.io', 'ann@x.io', 'Other Ann')",
    )
    .await;
    assert!(error.contains("users_email_key_key"), "{error}");
    let error = fails(&mut db, "INSERT INTO users (user_id, email, email_key, name) VALUES (gen_random_uuid(), 'b@x.io', 'b@x.io', '')").await;
    assert!(error.contains("check constraint"), "{error}");
}

#[tokio::test]
async fn inventory_units_always_add_up_and_never_go_negative() {
    let postgres = TestPostgres::start().await;
    let mut db = migrated(&postgres, "inventory").await;
    sql_query("INSERT INTO products (sku, name, price_cents, available, stocked) VALUES ('SKU-1', 'Lamp', 1999, 10, 10)")
        .execute(&mut db)
        .await
        .unwrap();
    // Moving units between columns keeps the sum.
    sql_query("UPDATE products SET available = available - 3, reserved = reserved + 3 WHERE sku = 'SKU-1'")
        .execute(&mut db)
        .await
        .unwrap();
    // A unit that appears from nowhere, or a reservation beyond what is there, is refused.
    let error = fails(
        &mut db,
        "UPDATE products SET reserved = reserved + 1 WHERE sku = 'SKU-1'",
    )
    .await;
    assert!(error.contains("check constraint"), "{error}");
    let error = fails(&mut db, "UPDATE products SET available = available - 8, reserved = reserved + 8 WHERE sku = 'SKU-1'").await;
    assert!(error.contains("products_available_check"), "{error}");
}

#[tokio::test]
async fn payment_balances_never_go_negative() {
    let postgres = TestPostgres::start().await;
    let mut db = migrated(&postgres, "payment").await;
    sql_query("INSERT INTO accounts (user_id, balance_cents) VALUES ('0190f0c2-0000-7000-8000-000000000001', 500)")
        .execute(&mut db)
        .await
        .unwrap();
    let error = fails(
        &mut db,
        "UPDATE accounts SET balance_cents = balance_cents - 501",
    )
    .await;
    assert!(error.contains("accounts_balance_cents_check"), "{error}");
}

#[tokio::test]
async fn order_idempotency_keys_are_unique_per_user_and_optional() {
    let postgres = TestPostgres::start().await;
    let mut db = migrated(&postgres, "order").await;
    let insert = |key: &str| {
        format!(
            "INSERT INTO orders (order_id, user_id, status, idempotency_key, deadline) \
             VALUES (gen_random_uuid(), '0190f0c2-0000-7000-8000-000000000001', 'PENDING', {key}, now())"
        )
    };
    sql_query(insert("'k1'")).execute(&mut db).await.unwrap();
    let error = fails(&mut db, &insert("'k1'")).await;
    assert!(
        error.contains("orders_user_id_idempotency_key_key"),
        "{error}"
    );
    // Without a key, orders are never deduplicated.
    sql_query(insert("NULL")).execute(&mut db).await.unwrap();
    sql_query(insert("NULL")).execute(&mut db).await.unwrap();
    let error = fails(&mut db, "UPDATE orders SET status = 'SHIPPED'").await;
    assert!(error.contains("orders_status_check"), "{error}");
}
