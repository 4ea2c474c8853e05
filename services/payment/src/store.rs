//! Every SQL statement of the payment service, each once, named after what
//! it does, on the connection (or transaction) it is given.

use std::collections::{HashMap, HashSet};

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use shop_db::KeepPrepared;
use uuid::Uuid;

use shop_domain::{OrderId, UserId};

use crate::domain::PaymentStatus;
use crate::schema::{accounts, deposits, payments};

/// A payment as stored.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = payments)]
pub(crate) struct PaymentRow {
    pub(crate) order_id: Uuid,
    pub(crate) user_id: Uuid,
    pub(crate) amount_cents: i64,
    pub(crate) status: String,
    pub(crate) reason: String,
}

/// A wallet's balance, if it has one.
pub(crate) async fn balance(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
) -> QueryResult<Option<i64>> {
    accounts::table
        .find(user_id)
        .select(accounts::balance_cents)
        .first(conn)
        .await
        .optional()
}

/// A wallet's balance, locked until the transaction ends.
pub(crate) async fn lock_balance(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
) -> QueryResult<Option<i64>> {
    accounts::table
        .find(user_id)
        .select(accounts::balance_cents)
        .for_update()
        .first(conn)
        .await
        .optional()
}

/// Sets a wallet's balance.
pub(crate) async fn set_balance(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
    balance_cents: i64,
) -> QueryResult<usize> {
    KeepPrepared(
        diesel::update(accounts::table.find(user_id))
            .set(accounts::balance_cents.eq(balance_cents)),
    )
    .execute(conn)
    .await
}

/// Records a deposit; a key used before for this user is a unique
/// violation.
pub(crate) async fn insert_deposit(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
    amount_cents: i64,
    key: Option<&str>,
) -> QueryResult<usize> {
    diesel::insert_into(deposits::table)
        .values((
            deposits::deposit_id.eq(Uuid::now_v7()),
            deposits::user_id.eq(user_id),
            deposits::amount_cents.eq(amount_cents),
            deposits::idempotency_key.eq(key),
        ))
        .execute(conn)
        .await
}

/// The amount first deposited under `key` by this user, if any.
pub(crate) async fn deposit_under(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
    key: &str,
) -> QueryResult<Option<i64>> {
    deposits::table
        .filter(deposits::user_id.eq(user_id))
        .filter(deposits::idempotency_key.eq(key))
        .select(deposits::amount_cents)
        .first(conn)
        .await
        .optional()
}

/// An order's payment, tombstones left out.
pub(crate) async fn payment(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
) -> QueryResult<Option<PaymentRow>> {
    payments::table
        .find(order_id)
        .filter(payments::status.ne(PaymentStatus::Cancelled.as_str()))
        .select(PaymentRow::as_select())
        .first(conn)
        .await
        .optional()
}

/// Opens a wallet with `credit`, unless it is open already.
pub(crate) async fn open_wallet(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
    credit: i64,
) -> QueryResult<usize> {
    diesel::insert_into(accounts::table)
        .values((
            accounts::user_id.eq(user_id),
            accounts::balance_cents.eq(credit),
        ))
        .on_conflict_do_nothing()
        .execute(conn)
        .await
}

/// Which of these orders have a payment row, locked.
pub(crate) async fn lock_decided(
    conn: &mut AsyncPgConnection,
    order_ids: &[Uuid],
) -> QueryResult<HashSet<OrderId>> {
    Ok(KeepPrepared(
        payments::table
            .filter(payments::order_id.eq_any(order_ids))
            .select(payments::order_id)
            .for_update(),
    )
    .load::<Uuid>(conn)
    .await?
    .into_iter()
    .map(OrderId::from)
    .collect())
}

/// The balances of these wallets, locked in id order, so that concurrent
/// transactions never deadlock.
pub(crate) async fn lock_balances(
    conn: &mut AsyncPgConnection,
    user_ids: &[Uuid],
) -> QueryResult<HashMap<UserId, i64>> {
    Ok(KeepPrepared(
        accounts::table
            .filter(accounts::user_id.eq_any(user_ids))
            .order(accounts::user_id)
            .select((accounts::user_id, accounts::balance_cents))
            .for_update(),
    )
    .load::<(Uuid, i64)>(conn)
    .await?
    .into_iter()
    .map(|(user_id, balance)| (UserId::from(user_id), balance))
    .collect())
}

/// Payments to insert, column by column.
#[derive(Debug, Default)]
pub(crate) struct NewPayments {
    pub(crate) order_ids: Vec<Uuid>,
    pub(crate) user_ids: Vec<Uuid>,
    pub(crate) amounts: Vec<i64>,
    pub(crate) statuses: Vec<&'static str>,
    pub(crate) reasons: Vec<String>,
}

/// Wallets debited (`$1`, `$2`: user, amount) and the payments decided
/// (`$3`..`$7`: order, user, amount, status, reason).
pub(crate) const WRITE_DEBITS: &str = "\
WITH debited AS (
    UPDATE accounts SET balance_cents = balance_cents - debit.amount
    FROM unnest($1::uuid[], $2::bigint[]) AS debit (user_id, amount)
    WHERE accounts.user_id = debit.user_id)
INSERT INTO payments (order_id, user_id, amount_cents, status, reason)
SELECT * FROM unnest($3::uuid[], $4::uuid[], $5::bigint[], $6::text[], $7::text[])";

/// Debits the wallets (`debited`: amount by user) and inserts the payments,
/// in one statement.
pub(crate) async fn write_debits(
    conn: &mut AsyncPgConnection,
    debited: &HashMap<UserId, i64>,
    payments: &NewPayments,
) -> QueryResult<usize> {
    let (users, amounts): (Vec<Uuid>, Vec<i64>) =
        debited.iter().map(|(u, a)| (u.get(), *a)).unzip();
    KeepPrepared(
        diesel::sql_query(WRITE_DEBITS)
            .bind::<Array<SqlUuid>, _>(&users)
            .bind::<Array<BigInt>, _>(&amounts)
            .bind::<Array<SqlUuid>, _>(&payments.order_ids)
            .bind::<Array<SqlUuid>, _>(&payments.user_ids)
            .bind::<Array<BigInt>, _>(&payments.amounts)
            .bind::<Array<Text>, _>(&payments.statuses)
            .bind::<Array<Text>, _>(&payments.reasons),
    )
    .execute(conn)
    .await
}

/// An order's payment (status, amount, payer), locked.
pub(crate) async fn lock_payment(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
) -> QueryResult<Option<(String, i64, Uuid)>> {
    payments::table
        .find(order_id)
        .select((payments::status, payments::amount_cents, payments::user_id))
        .for_update()
        .first(conn)
        .await
        .optional()
}

/// Marks a payment refunded.
pub(crate) async fn mark_refunded(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
) -> QueryResult<usize> {
    KeepPrepared(diesel::update(payments::table.find(order_id)).set((
        payments::status.eq(PaymentStatus::Refunded.as_str()),
        payments::updated_at.eq(diesel::dsl::now),
    )))
    .execute(conn)
    .await
}

/// A tombstone for an order cancelled before it was charged.
pub(crate) async fn insert_tombstone(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
    user_id: Uuid,
) -> QueryResult<usize> {
    diesel::insert_into(payments::table)
        .values((
            payments::order_id.eq(order_id),
            payments::user_id.eq(user_id),
            payments::amount_cents.eq(0),
            payments::status.eq(PaymentStatus::Cancelled.as_str()),
            payments::reason.eq("cancelled before payment"),
        ))
        .execute(conn)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn every_statement_written_as_sql_prepares_against_the_migrated_schema() {
        let postgres = shop_test_support::TestPostgres::start().await;
        let url = postgres.create_database("payment").await;
        shop_db::migrate(&url, vec![shop_messaging::MIGRATIONS, crate::MIGRATIONS])
            .await
            .unwrap_or_else(|error| panic!("{error}"));
        shop_test_support::assert_statements_prepare(&url, &[("WRITE_DEBITS", WRITE_DEBITS)]).await;
    }
}
