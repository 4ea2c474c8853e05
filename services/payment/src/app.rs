//! The payment service's use cases: wallets (gRPC) and the saga steps
//! (events).

use std::collections::{BTreeMap, HashMap, HashSet};

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text, Uuid as SqlUuid};
use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl};
use shop_db::{Cached, PgPool};
use shop_messaging::HandlerError;
use shop_service::{ApiError, Caller, is_unique_violation, limits, roles};
use uuid::Uuid;

use crate::schema::{accounts, deposits, payments};

/// The statuses a payment row can have. `CANCELLED` is a tombstone: the
/// order was cancelled before any capture, so a late reservation must not
/// debit the wallet.
pub(crate) mod status {
    pub(crate) const CAPTURED: &str = "CAPTURED";
    pub(crate) const DECLINED: &str = "DECLINED";
    pub(crate) const REFUNDED: &str = "REFUNDED";
    pub(crate) const CANCELLED: &str = "CANCELLED";
}

/// A payment as stored.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = payments)]
pub(crate) struct Payment {
    pub(crate) order_id: Uuid,
    pub(crate) user_id: Uuid,
    pub(crate) amount_cents: i64,
    pub(crate) status: String,
    pub(crate) reason: String,
}

/// The wallet use cases.
#[derive(Clone)]
pub(crate) struct Wallets {
    pool: PgPool,
}

impl Wallets {
    pub(crate) fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// A wallet's balance: the caller's own, or anyone's for an administrator.
    pub(crate) async fn balance(&self, caller: &Caller, user_id: Uuid) -> Result<i64, ApiError> {
        caller.require_user(user_id)?;
        self.read_balance(user_id).await
    }

    async fn read_balance(&self, user_id: Uuid) -> Result<i64, ApiError> {
        let mut conn = self.pool.get().await?;
        accounts::table
            .find(user_id)
            .select(accounts::balance_cents)
            .first(&mut conn)
            .await
            .optional()?
            .ok_or_else(|| ApiError::NotFound(format!("no wallet for user {user_id}")))
    }

    /// Adds money; a repeated `idempotency_key` with the same amount credits
    /// once and returns the balance as it is, with another amount it is
    /// FAILED_PRECONDITION. Money comes in through a payment provider (or an
    /// administrator), never from the customer's own token.
    pub(crate) async fn deposit(
        &self,
        caller: &Caller,
        user_id: Uuid,
        amount_cents: i64,
        idempotency_key: &str,
    ) -> Result<i64, ApiError> {
        caller.require_role("Deposit", &[roles::PAYMENT_PROVIDER])?;
        if !(1..=limits::MAX_DEPOSIT_CENTS).contains(&amount_cents) {
            return Err(ApiError::InvalidArgument(format!(
                "amount_cents must be 1 to {}, got {amount_cents}",
                limits::MAX_DEPOSIT_CENTS
            )));
        }
        if idempotency_key.chars().count() > 200 {
            return Err(ApiError::InvalidArgument(
                "idempotency_key must be at most 200 characters".into(),
            ));
        }
        if idempotency_key.contains('\0') {
            return Err(ApiError::InvalidArgument(
                "idempotency_key must not contain NUL characters".into(),
            ));
        }
        let key = Some(idempotency_key).filter(|key| !key.is_empty());
        let mut conn = self.pool.get().await?;
        let result = conn
            .transaction::<_, DepositError, _>(async |conn| {
                let balance: i64 = accounts::table
                    .find(user_id)
                    .select(accounts::balance_cents)
                    .for_update()
                    .first(conn)
                    .await
                    .optional()?
                    .ok_or(DepositError::NoWallet)?;
                let new_balance = balance
                    .checked_add(amount_cents)
                    .filter(|new_balance| *new_balance <= limits::MAX_BALANCE_CENTS)
                    .ok_or(DepositError::OverLimit(balance))?;
                diesel::insert_into(deposits::table)
                    .values((
                        deposits::deposit_id.eq(Uuid::now_v7()),
                        deposits::user_id.eq(user_id),
                        deposits::amount_cents.eq(amount_cents),
                        deposits::idempotency_key.eq(key),
                    ))
                    .execute(conn)
                    .await?;
                Cached(
                    diesel::update(accounts::table.find(user_id))
                        .set(accounts::balance_cents.eq(new_balance)),
                )
                .execute(conn)
                .await?;
                Ok(new_balance)
            })
            .await;
        drop(conn);
        match result {
            Ok(balance) => Ok(balance),
            Err(DepositError::NoWallet) => {
                Err(ApiError::NotFound(format!("no wallet for user {user_id}")))
            }
            // The same deposit again: it was credited the first time. The
            // key names one request: another amount under it is a client's
            // bug, not a retry. (A repeat may also find the balance past the
            // limit, the first deposit having brought it there.)
            Err(DepositError::Database(error)) if is_unique_violation(&error) => {
                self.repeated(user_id, key, amount_cents).await
            }
            Err(DepositError::OverLimit(balance)) => {
                if key.is_some() && self.first_deposit(user_id, key).await?.is_some() {
                    return self.repeated(user_id, key, amount_cents).await;
                }
                Err(ApiError::OutOfRange(format!(
                    "a deposit of {amount_cents} cents would bring the balance of {balance} past the limit of {} cents",
                    limits::MAX_BALANCE_CENTS
                )))
            }
            Err(DepositError::Database(error)) => Err(error.into()),
        }
    }

    /// The amount first deposited under `key`, if any.
    async fn first_deposit(
        &self,
        user_id: Uuid,
        key: Option<&str>,
    ) -> Result<Option<i64>, ApiError> {
        let mut conn = self.pool.get().await?;
        Ok(deposits::table
            .filter(deposits::user_id.eq(user_id))
            .filter(deposits::idempotency_key.eq(key))
            .select(deposits::amount_cents)
            .first(&mut conn)
            .await
            .optional()?)
    }

    /// The answer to a deposit repeated under `key`: the balance as it is,
    /// or FAILED_PRECONDITION when the key was used for another amount.
    async fn repeated(
        &self,
        user_id: Uuid,
        key: Option<&str>,
        amount_cents: i64,
    ) -> Result<i64, ApiError> {
        let first = self.first_deposit(user_id, key).await?.ok_or_else(|| {
            ApiError::Unavailable("the deposit under this key went away; retry".into())
        })?;
        if first != amount_cents {
            return Err(ApiError::FailedPrecondition(format!(
                "idempotency_key {:?} was used for a deposit of {first} cents, not {amount_cents}: use a new key for a new deposit",
                key.unwrap_or_default()
            )));
        }
        self.read_balance(user_id).await
    }

    /// An order's payment: the caller's own, or anyone's for an
    /// administrator.
    pub(crate) async fn payment(
        &self,
        caller: &Caller,
        order_id: Uuid,
    ) -> Result<Payment, ApiError> {
        let mut conn = self.pool.get().await?;
        let payment = payments::table
            .find(order_id)
            .filter(payments::status.ne(status::CANCELLED))
            .select(Payment::as_select())
            .first(&mut conn)
            .await
            .optional()?
            .ok_or_else(|| ApiError::NotFound(format!("no payment for order {order_id}")))?;
        caller.require_user(payment.user_id)?;
        Ok(payment)
    }
}

/// Step 0': a new user's wallet with the starting credit.
pub(crate) async fn open_wallet(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
    credit: i64,
) -> Result<(), HandlerError> {
    diesel::insert_into(accounts::table)
        .values((
            accounts::user_id.eq(user_id),
            accounts::balance_cents.eq(credit),
        ))
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    Ok(())
}

/// What a debit decided.
#[derive(Debug)]
pub(crate) enum Debit {
    Captured,
    Declined(String),
    /// Seen before (redelivery), or cancelled before it came: no effect.
    AlreadyDecided,
}

/// A reserved order to charge.
pub(crate) struct Charge {
    pub(crate) order_id: Uuid,
    pub(crate) user_id: Uuid,
    pub(crate) amount_cents: i64,
}

/// Step 3 for several reserved orders, one after another in the order
/// given: each debits its wallet if the balance the ones before it left
/// covers it. A few statements whatever the number of orders.
pub(crate) async fn debit(
    conn: &mut AsyncPgConnection,
    charges: &[Charge],
) -> Result<Vec<Debit>, HandlerError> {
    let order_ids: Vec<Uuid> = charges.iter().map(|charge| charge.order_id).collect();
    let mut decided: HashSet<Uuid> = Cached(
        payments::table
            .filter(payments::order_id.eq_any(&order_ids))
            .select(payments::order_id)
            .for_update(),
    )
    .load(conn)
    .await?
    .into_iter()
    .collect();
    let mut user_ids: Vec<Uuid> = charges.iter().map(|charge| charge.user_id).collect();
    user_ids.sort_unstable();
    user_ids.dedup();
    // Locked in id order, so concurrent transactions never deadlock.
    let mut balances: HashMap<Uuid, i64> = Cached(
        accounts::table
            .filter(accounts::user_id.eq_any(&user_ids))
            .order(accounts::user_id)
            .select((accounts::user_id, accounts::balance_cents))
            .for_update(),
    )
    .load::<(Uuid, i64)>(conn)
    .await?
    .into_iter()
    .collect();
    let mut debited: BTreeMap<Uuid, i64> = BTreeMap::new();
    let mut rows = NewPayments::default();
    let mut decisions = Vec::with_capacity(charges.len());
    for charge in charges {
        // Seen before (a redelivery under another id, or a cancellation that
        // overtook it), or earlier in this batch.
        if !decided.insert(charge.order_id) {
            decisions.push(Debit::AlreadyDecided);
            continue;
        }
        // `user.created` comes on another stream and may not be here yet.
        let balance = balances.get_mut(&charge.user_id).ok_or_else(|| {
            HandlerError::transient(format!("no wallet for user {} yet", charge.user_id))
        })?;
        let amount = charge.amount_cents;
        let (status, reason, decision) = if *balance >= amount {
            *balance -= amount;
            *debited.entry(charge.user_id).or_default() += amount;
            (status::CAPTURED, String::new(), Debit::Captured)
        } else {
            let reason =
                format!("insufficient funds: balance {balance} cents, order {amount} cents");
            (status::DECLINED, reason.clone(), Debit::Declined(reason))
        };
        rows.order_ids.push(charge.order_id);
        rows.user_ids.push(charge.user_id);
        rows.amounts.push(amount);
        rows.statuses.push(status);
        rows.reasons.push(reason);
        decisions.push(decision);
    }
    if rows.order_ids.is_empty() {
        return Ok(decisions);
    }
    // The balances and the payments in one statement.
    let (users, amounts): (Vec<Uuid>, Vec<i64>) = debited.into_iter().unzip();
    Cached(
        diesel::sql_query(
            "WITH debited AS (UPDATE accounts SET balance_cents = balance_cents - debit.amount \
             FROM unnest($1::uuid[], $2::bigint[]) AS debit (user_id, amount) \
             WHERE accounts.user_id = debit.user_id) \
             INSERT INTO payments (order_id, user_id, amount_cents, status, reason) \
             SELECT * FROM unnest($3::uuid[], $4::uuid[], $5::bigint[], $6::text[], $7::text[])",
        )
        .bind::<Array<SqlUuid>, _>(&users)
        .bind::<Array<BigInt>, _>(&amounts)
        .bind::<Array<SqlUuid>, _>(&rows.order_ids)
        .bind::<Array<SqlUuid>, _>(&rows.user_ids)
        .bind::<Array<BigInt>, _>(&rows.amounts)
        .bind::<Array<Text>, _>(&rows.statuses)
        .bind::<Array<Text>, _>(&rows.reasons),
    )
    .execute(conn)
    .await?;
    Ok(decisions)
}

/// Payments to insert, column by column.
#[derive(Default)]
struct NewPayments {
    order_ids: Vec<Uuid>,
    user_ids: Vec<Uuid>,
    amounts: Vec<i64>,
    statuses: Vec<&'static str>,
    reasons: Vec<String>,
}

/// Compensation c3: refund a cancelled order's capture. Returns the amount
/// refunded. An order not paid yet gets a tombstone.
pub(crate) async fn refund(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
    user_id: Uuid,
) -> Result<Option<i64>, HandlerError> {
    let payment: Option<(String, i64, Uuid)> = payments::table
        .find(order_id)
        .select((payments::status, payments::amount_cents, payments::user_id))
        .for_update()
        .first(conn)
        .await
        .optional()?;
    match payment {
        Some((state, amount, payer)) if state == status::CAPTURED => {
            // Deposits stop at MAX_BALANCE_CENTS, so a refund fits unless
            // thousands of the largest orders were captured and refunded
            // to one wallet: then say so, rather than fail in SQL.
            let balance: i64 = accounts::table
                .find(payer)
                .select(accounts::balance_cents)
                .for_update()
                .first(conn)
                .await?;
            let refunded = balance.checked_add(amount).ok_or_else(|| {
                HandlerError::permanent(format!(
                    "refunding {amount} cents to {payer} would overflow its balance of {balance} cents"
                ))
            })?;
            Cached(
                diesel::update(accounts::table.find(payer))
                    .set(accounts::balance_cents.eq(refunded)),
            )
            .execute(conn)
            .await?;
            Cached(diesel::update(payments::table.find(order_id)).set((
                payments::status.eq(status::REFUNDED),
                payments::updated_at.eq(diesel::dsl::now),
            )))
            .execute(conn)
            .await?;
            Ok(Some(amount))
        }
        Some(_) => Ok(None),
        None => {
            diesel::insert_into(payments::table)
                .values((
                    payments::order_id.eq(order_id),
                    payments::user_id.eq(user_id),
                    payments::amount_cents.eq(0),
                    payments::status.eq(status::CANCELLED),
                    payments::reason.eq("cancelled before payment"),
                ))
                .execute(conn)
                .await?;
            Ok(None)
        }
    }
}

enum DepositError {
    NoWallet,
    /// The deposit would bring the balance (this one) past the limit.
    OverLimit(i64),
    Database(diesel::result::Error),
}

impl From<diesel::result::Error> for DepositError {
    fn from(error: diesel::result::Error) -> Self {
        Self::Database(error)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use shop_test_support::TestPostgres;

    use super::*;

    /// A fresh, migrated payment database and a connection to it.
    async fn migrated() -> (TestPostgres, AsyncPgConnection) {
        let postgres = TestPostgres::start().await;
        let url = postgres.create_database("payment").await;
        shop_db::migrate(&url, vec![shop_messaging::MIGRATIONS, crate::MIGRATIONS])
            .await
            .unwrap();
        let conn = AsyncPgConnection::establish(&url).await.unwrap();
        (postgres, conn)
    }

    /// A refund that a balance could not hold (out of reach through the
    /// API, whose deposits stop at MAX_BALANCE_CENTS) fails permanently,
    /// saying why, and changes nothing.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_refund_past_what_a_balance_holds_says_so_and_changes_nothing() {
        let (_postgres, mut conn) = migrated().await;
        let ann = Uuid::now_v7();
        open_wallet(&mut conn, ann, 100).await.unwrap();
        let order_id = Uuid::now_v7();
        let charge = Charge {
            order_id,
            user_id: ann,
            amount_cents: 100,
        };
        assert!(matches!(
            debit(&mut conn, &[charge]).await.unwrap()[..],
            [Debit::Captured]
        ));
        diesel::update(accounts::table.find(ann))
            .set(accounts::balance_cents.eq(i64::MAX - 10))
            .execute(&mut conn)
            .await
            .unwrap();
        let error = refund(&mut conn, order_id, ann).await.unwrap_err();
        match error {
            HandlerError::Permanent(reason) => {
                assert!(reason.contains("would overflow"), "{reason}");
            }
            other => panic!("{other}"),
        }
        let status: String = payments::table
            .find(order_id)
            .select(payments::status)
            .first(&mut conn)
            .await
            .unwrap();
        assert_eq!(status, status::CAPTURED);
        let balance: i64 = accounts::table
            .find(ann)
            .select(accounts::balance_cents)
            .first(&mut conn)
            .await
            .unwrap();
        assert_eq!(balance, i64::MAX - 10);
    }

    /// Several charges in one call decide as they would one after another:
    /// each sees the balance the ones before it left.
    #[tokio::test(flavor = "multi_thread")]
    async fn charges_debited_together_take_the_balance_in_turn() {
        let (_postgres, mut conn) = migrated().await;
        let ann = Uuid::now_v7();
        let bob = Uuid::now_v7();
        open_wallet(&mut conn, ann, 100).await.unwrap();
        open_wallet(&mut conn, bob, 10).await.unwrap();
        let charge = |user_id, amount_cents| Charge {
            order_id: Uuid::now_v7(),
            user_id,
            amount_cents,
        };
        let first = charge(ann, 60);
        let again = Charge {
            amount_cents: 1,
            ..first
        };
        let charges = [
            first,
            charge(ann, 60),
            charge(bob, 10),
            charge(ann, 40),
            again,
        ];
        let decisions = debit(&mut conn, &charges).await.unwrap();
        let summary: Vec<String> = decisions
            .iter()
            .map(|decision| match decision {
                Debit::Captured => "captured".into(),
                Debit::Declined(reason) => reason.clone(),
                Debit::AlreadyDecided => "already decided".into(),
            })
            .collect();
        assert_eq!(
            summary,
            [
                "captured",
                "insufficient funds: balance 40 cents, order 60 cents",
                "captured",
                "captured",
                "already decided",
            ]
        );
        let balances: Vec<i64> = accounts::table
            .filter(accounts::user_id.eq_any([ann, bob]))
            .order(accounts::user_id)
            .select(accounts::balance_cents)
            .load(&mut conn)
            .await
            .unwrap();
        assert_eq!(balances, [0, 0]);
        // A redelivery of the whole batch changes nothing.
        let decisions = debit(&mut conn, &charges).await.unwrap();
        assert!(
            decisions
                .iter()
                .all(|decision| matches!(decision, Debit::AlreadyDecided))
        );
        // A wallet not opened yet: the call fails to be retried, and
        // records nothing.
        let error = debit(&mut conn, &[charge(Uuid::now_v7(), 1)])
            .await
            .unwrap_err();
        assert!(matches!(error, HandlerError::Transient(_)), "{error}");
        let payments: i64 = payments::table.count().get_result(&mut conn).await.unwrap();
        assert_eq!(payments, 4);
    }
}
