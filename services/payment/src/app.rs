//! The payment service's use cases: wallets (gRPC) and the saga steps
//! (events).

use diesel::prelude::*;
use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl};
use shop_db::{Cached, PgPool};
use shop_messaging::HandlerError;
use shop_service::{ApiError, is_unique_violation};
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

    pub(crate) async fn balance(&self, user_id: Uuid) -> Result<i64, ApiError> {
        let mut conn = self.pool.get().await?;
        accounts::table
            .find(user_id)
            .select(accounts::balance_cents)
            .first(&mut conn)
            .await
            .optional()?
            .ok_or_else(|| ApiError::NotFound(format!("no wallet for user {user_id}")))
    }

    /// Adds money; a repeated `idempotency_key` credits once and returns the
    /// balance as it is.
    pub(crate) async fn deposit(
        &self,
        user_id: Uuid,
        amount_cents: i64,
        idempotency_key: &str,
    ) -> Result<i64, ApiError> {
        if amount_cents < 1 {
            return Err(ApiError::InvalidArgument(format!(
                "amount_cents must be at least 1, got {amount_cents}"
            )));
        }
        if idempotency_key.chars().count() > 200 {
            return Err(ApiError::InvalidArgument(
                "idempotency_key must be at most 200 characters".into(),
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
                    .ok_or(DepositError::Overflow)?;
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
            Err(DepositError::Overflow) => Err(ApiError::InvalidArgument(
                "the deposit would overflow the balance".into(),
            )),
            // The same deposit again: it was credited the first time.
            Err(DepositError::Database(error)) if is_unique_violation(&error) => {
                self.balance(user_id).await
            }
            Err(DepositError::Database(error)) => Err(error.into()),
        }
    }

    pub(crate) async fn payment(&self, order_id: Uuid) -> Result<Payment, ApiError> {
        let mut conn = self.pool.get().await?;
        payments::table
            .find(order_id)
            .filter(payments::status.ne(status::CANCELLED))
            .select(Payment::as_select())
            .first(&mut conn)
            .await
            .optional()?
            .ok_or_else(|| ApiError::NotFound(format!("no payment for order {order_id}")))
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
pub(crate) enum Debit {
    Captured,
    Declined(String),
    /// Seen before (redelivery), or cancelled before it came: no effect.
    AlreadyDecided,
}

/// Step 3: debit the wallet for a reserved order.
pub(crate) async fn debit(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
    user_id: Uuid,
    amount: i64,
) -> Result<Debit, HandlerError> {
    let seen: Option<String> = payments::table
        .find(order_id)
        .select(payments::status)
        .for_update()
        .first(conn)
        .await
        .optional()?;
    if seen.is_some() {
        return Ok(Debit::AlreadyDecided);
    }
    let balance: Option<i64> = accounts::table
        .find(user_id)
        .select(accounts::balance_cents)
        .for_update()
        .first(conn)
        .await
        .optional()?;
    // `user.created` comes on another stream and may not be here yet.
    let balance = balance
        .ok_or_else(|| HandlerError::transient(format!("no wallet for user {user_id} yet")))?;
    let (status, reason, decision) = if balance >= amount {
        Cached(
            diesel::update(accounts::table.find(user_id))
                .set(accounts::balance_cents.eq(accounts::balance_cents - amount)),
        )
        .execute(conn)
        .await?;
        (status::CAPTURED, String::new(), Debit::Captured)
    } else {
        let reason = format!("insufficient funds: balance {balance} cents, order {amount} cents");
        (status::DECLINED, reason.clone(), Debit::Declined(reason))
    };
    diesel::insert_into(payments::table)
        .values((
            payments::order_id.eq(order_id),
            payments::user_id.eq(user_id),
            payments::amount_cents.eq(amount),
            payments::status.eq(status),
            payments::reason.eq(reason),
        ))
        .execute(conn)
        .await?;
    Ok(decision)
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
            Cached(
                diesel::update(accounts::table.find(payer))
                    .set(accounts::balance_cents.eq(accounts::balance_cents + amount)),
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
    Overflow,
    Database(diesel::result::Error),
}

impl From<diesel::result::Error> for DepositError {
    fn from(error: diesel::result::Error) -> Self {
        Self::Database(error)
    }
}
