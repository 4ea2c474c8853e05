//! Every SQL statement of the payment service, each once, named after what
//! it does, on the connection (or transaction) it is given.

use std::collections::{HashMap, HashSet};

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use pg_jetstream::consumer::Carried;
use pg_jetstream::db::KeepPrepared;
use uuid::Uuid;

use shop_domain::{OrderId, UserId};

use crate::domain::PaymentStatus;
use crate::schema::{accounts, deposits, payments, provider_webhooks};

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

/// Which of these orders have a payment row (read without a lock: the
/// step's statement checks it still holds, see [`WRITE_DEBITS`]).
/// Takes a shared connection so that it can be sent with another read in
/// one round trip (diesel-async pipelines what is polled together).
pub(crate) async fn decided(
    mut conn: &AsyncPgConnection,
    order_ids: &[Uuid],
) -> QueryResult<HashSet<OrderId>> {
    Ok(payments::table
        .filter(payments::order_id.eq_any(order_ids))
        .select(payments::order_id)
        .load::<Uuid>(&mut conn)
        .await?
        .into_iter()
        .map(OrderId::from)
        .collect())
}

/// The balances of these wallets (read without a lock, see
/// [`WRITE_DEBITS`]; a shared connection, as [`decided`]).
pub(crate) async fn balances(
    mut conn: &AsyncPgConnection,
    user_ids: &[Uuid],
) -> QueryResult<HashMap<UserId, i64>> {
    Ok(accounts::table
        .filter(accounts::user_id.eq_any(user_ids))
        .select((accounts::user_id, accounts::balance_cents))
        .load::<(Uuid, i64)>(&mut conn)
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

/// Wallets debited, column by column, in user order: each one's balance as
/// it was read and as it is to be.
#[derive(Debug, Default)]
pub(crate) struct Debited {
    pub(crate) user_ids: Vec<Uuid>,
    pub(crate) read: Vec<i64>,
    pub(crate) balances: Vec<i64>,
}

/// The payment's one statement, which commits by itself: the wallets debited
/// (`$1`..`$3`: user, balance read, new balance) if their balances are
/// still those read, the payments decided (`$4`..`$8`: order, user, amount,
/// status, reason) if none was decided meanwhile, else a serialization
/// failure and nothing written; with the events' inbox rows (`$9`, `$10`)
/// and the events they emit (`$11`).
pub(crate) const WRITE_DEBITS: &str = "\
WITH debited AS (
    UPDATE accounts SET balance_cents = debit.balance
    FROM unnest($1::uuid[], $2::bigint[], $3::bigint[]) AS debit (user_id, read, balance)
    WHERE accounts.user_id = debit.user_id AND accounts.balance_cents = debit.read
    RETURNING 1),
decided AS (
    INSERT INTO payments (order_id, user_id, amount_cents, status, reason)
    SELECT * FROM unnest($4::uuid[], $5::uuid[], $6::bigint[], $7::text[], $8::text[])
    ON CONFLICT (order_id) DO NOTHING
    RETURNING 1),
checked AS (
    SELECT stale_unless(
        (SELECT count(*) FROM debited) = cardinality($1::uuid[])
        AND (SELECT count(*) FROM decided) = cardinality($4::uuid[]),
        'wallets or payments changed since they were read'))
SELECT count(*) FROM checked, inbox_write($9, $10::uuid[]), outbox_write($11::jsonb)";

/// Writes the payment's decisions in [`WRITE_DEBITS`], carrying `carried`.
pub(crate) async fn write_debits(
    conn: &mut AsyncPgConnection,
    debited: &Debited,
    payments: &NewPayments,
    carried: &Carried,
) -> QueryResult<usize> {
    KeepPrepared(
        diesel::sql_query(WRITE_DEBITS)
            .bind::<Array<SqlUuid>, _>(&debited.user_ids)
            .bind::<Array<BigInt>, _>(&debited.read)
            .bind::<Array<BigInt>, _>(&debited.balances)
            .bind::<Array<SqlUuid>, _>(&payments.order_ids)
            .bind::<Array<SqlUuid>, _>(&payments.user_ids)
            .bind::<Array<BigInt>, _>(&payments.amounts)
            .bind::<Array<Text>, _>(&payments.statuses)
            .bind::<Array<Text>, _>(&payments.reasons)
            .bind::<Text, _>(carried.consumer())
            .bind::<Array<SqlUuid>, _>(carried.event_ids())
            .bind::<Text, _>(carried.events_json()),
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

/// Payments sent to a provider: each order's intent, PENDING and due at
/// once, unless the order has a row already (a tombstone, a redelivery).
pub(crate) async fn record_intents(
    conn: &mut AsyncPgConnection,
    order_ids: &[Uuid],
    user_ids: &[Uuid],
    amounts: &[i64],
    traceparent: Option<&str>,
) -> QueryResult<usize> {
    diesel::sql_query(
        "INSERT INTO payments (order_id, user_id, amount_cents, status, next_attempt_at, traceparent)
         SELECT o, u, a, 'PENDING', now(), $4
         FROM unnest($1::uuid[], $2::uuid[], $3::bigint[]) AS i (o, u, a)
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind::<Array<SqlUuid>, _>(order_ids)
    .bind::<Array<SqlUuid>, _>(user_ids)
    .bind::<Array<BigInt>, _>(amounts)
    .bind::<diesel::sql_types::Nullable<Text>, _>(traceparent)
    .execute(conn)
    .await
}

/// A provider's payment claimed for a call.
#[derive(Debug, Clone, QueryableByName)]
pub(crate) struct Due {
    #[diesel(sql_type = SqlUuid)]
    pub(crate) order_id: Uuid,
    #[diesel(sql_type = BigInt)]
    pub(crate) amount_cents: i64,
    #[diesel(sql_type = Text)]
    pub(crate) status: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    pub(crate) provider_payment_id: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pub(crate) attempts: i32,
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    pub(crate) traceparent: Option<String>,
}

/// Claims up to `limit` payments whose call is due (PENDING: the charge;
/// REFUNDING: the refund), skipping those another replica holds, and
/// makes each due again only after `lease` seconds plus a backoff that
/// doubles with its attempts (0.2 s to 30 s): a process that dies
/// mid-call leaves the payment to be called again, under the same key.
pub(crate) async fn claim_due(
    conn: &mut AsyncPgConnection,
    limit: i64,
    lease: f64,
) -> QueryResult<Vec<Due>> {
    diesel::sql_query(
        "UPDATE payments p
         SET attempts = p.attempts + 1,
             next_attempt_at = now() + make_interval(
                 secs => $2 + least(30.0, 0.2 * power(2, least(p.attempts, 8))))
         WHERE p.order_id IN (
             SELECT order_id FROM payments
             WHERE status IN ('PENDING', 'REFUNDING') AND next_attempt_at <= now()
             ORDER BY next_attempt_at
             LIMIT $1
             FOR UPDATE SKIP LOCKED)
         RETURNING p.order_id, p.amount_cents, p.status, p.provider_payment_id, p.attempts,
                   p.traceparent",
    )
    .bind::<BigInt, _>(limit)
    .bind::<diesel::sql_types::Double, _>(lease)
    .load(conn)
    .await
}

/// A provider's payment as it stands, locked.
#[derive(Debug, Clone, Queryable)]
pub(crate) struct Standing {
    pub(crate) status: String,
    pub(crate) cancel_requested: bool,
    pub(crate) user_id: Uuid,
    pub(crate) amount_cents: i64,
    pub(crate) provider_payment_id: Option<String>,
    /// Calls made in this state.
    pub(crate) attempts: i32,
    /// The saga's trace, where the intent was recorded.
    pub(crate) traceparent: Option<String>,
}

/// An order's payment as it stands, locked, if it has one.
pub(crate) async fn lock_standing(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
) -> QueryResult<Option<Standing>> {
    payments::table
        .find(order_id)
        .select((
            payments::status,
            payments::cancel_requested,
            payments::user_id,
            payments::amount_cents,
            payments::provider_payment_id,
            payments::attempts,
            payments::traceparent,
        ))
        .for_update()
        .first(conn)
        .await
        .optional()
}

/// Moves a provider's payment to `status`, with the provider's id of its
/// charge: REFUNDING is due for its refund at once; any other state is
/// done with calls.
pub(crate) async fn settle(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
    status: PaymentStatus,
    provider_payment_id: Option<&str>,
    reason: &str,
) -> QueryResult<usize> {
    let due = status == PaymentStatus::Refunding;
    diesel::update(payments::table.find(order_id))
        .set((
            payments::status.eq(status.as_str()),
            payments::provider_payment_id.eq(provider_payment_id),
            payments::reason.eq(reason),
            payments::attempts.eq(0),
            payments::next_attempt_at.eq(due.then(chrono::Utc::now)),
            payments::updated_at.eq(diesel::dsl::now),
        ))
        .execute(conn)
        .await
}

/// Asks that a PENDING charge be refunded if it succeeds.
pub(crate) async fn request_cancel(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
) -> QueryResult<usize> {
    diesel::update(payments::table.find(order_id))
        .set(payments::cancel_requested.eq(true))
        .execute(conn)
        .await
}

/// Records a webhook event; 0 when it was recorded before (a duplicate).
pub(crate) async fn record_webhook(
    conn: &mut AsyncPgConnection,
    event_id: &str,
    kind: &str,
) -> QueryResult<usize> {
    diesel::insert_into(provider_webhooks::table)
        .values((
            provider_webhooks::event_id.eq(event_id),
            provider_webhooks::kind.eq(kind),
        ))
        .on_conflict_do_nothing()
        .execute(conn)
        .await
}

/// The provider's payments not settled, by state (PENDING, REFUNDING):
/// how many, and the seconds since the oldest entered its state.
pub(crate) async fn unsettled(
    conn: &mut AsyncPgConnection,
) -> QueryResult<Vec<(String, i64, f64)>> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        status: String,
        #[diesel(sql_type = BigInt)]
        count: i64,
        #[diesel(sql_type = diesel::sql_types::Double)]
        age: f64,
    }
    let rows: Vec<Row> = diesel::sql_query(
        "SELECT status, count(*) AS count,
                extract(epoch FROM now() - min(updated_at))::float8 AS age
         FROM payments WHERE status IN ('PENDING', 'REFUNDING')
         GROUP BY status",
    )
    .load(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| (row.status, row.count, row.age))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn every_statement_written_as_sql_prepares_against_the_migrated_schema() {
        let postgres = shop_test_support::TestPostgres::start().await;
        let url = postgres.create_database("payment").await;
        pg_jetstream::db::migrate(&url, vec![pg_jetstream::MIGRATIONS, crate::MIGRATIONS])
            .await
            .unwrap_or_else(|error| panic!("{error}"));
        shop_test_support::assert_statements_prepare(&url, &[("WRITE_DEBITS", WRITE_DEBITS)]).await;
    }
}
