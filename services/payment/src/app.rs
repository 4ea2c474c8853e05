//! The payment service's use cases: wallets (gRPC) and the saga steps
//! (events), deciding with [`crate::domain`] and storing with
//! [`crate::store`].

use diesel_async::{AsyncConnection as _, AsyncPgConnection};
use pg_jetstream::db::PgPool;
use pg_jetstream::{HandlerError, consumer::Carried};
use shop_domain::UserId;
use shop_service::{
    ApiError, Caller, is_unique_violation, limits, roles, step_failed, unknown_stored,
};
use uuid::Uuid;

use crate::domain::{self, Charge, Debit, Deposit, PaymentStatus, ProviderCancel, Refund};
use crate::store::{self, NewPayments};

/// An order's payment, as the API shows it.
#[derive(Debug, Clone)]
pub(crate) struct Payment {
    pub(crate) order_id: Uuid,
    pub(crate) user_id: Uuid,
    pub(crate) amount_cents: i64,
    pub(crate) status: PaymentStatus,
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
        store::balance(&mut conn, user_id)
            .await?
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
        let deposit =
            Deposit::parse(amount_cents, idempotency_key).map_err(ApiError::InvalidArgument)?;
        let key = deposit.key.as_deref();
        let mut conn = self.pool.get().await?;
        let result = conn
            .transaction::<_, DepositError, _>(async |conn| {
                let balance = store::lock_balance(conn, user_id)
                    .await?
                    .ok_or(DepositError::NoWallet)?;
                let new_balance = deposit
                    .credit(balance)
                    .ok_or(DepositError::OverLimit(balance))?;
                store::insert_deposit(conn, user_id, amount_cents, key).await?;
                store::set_balance(conn, user_id, new_balance).await?;
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
                if self.first_deposit(user_id, key).await?.is_some() {
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
        let Some(key) = key else { return Ok(None) };
        let mut conn = self.pool.get().await?;
        Ok(store::deposit_under(&mut conn, user_id, key).await?)
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
        let not_found = || ApiError::NotFound(format!("no payment for order {order_id}"));
        let row = store::payment(&mut conn, order_id)
            .await?
            .ok_or_else(not_found)?;
        caller.require_user(row.user_id)?;
        let status = PaymentStatus::parse(&row.status)?;
        // A tombstone (left out by the query too) is no payment.
        if status == PaymentStatus::Cancelled {
            return Err(not_found());
        }
        Ok(Payment {
            order_id: row.order_id,
            user_id: row.user_id,
            amount_cents: row.amount_cents,
            status,
            reason: row.reason,
        })
    }
}

/// On `user.created`: a new user's wallet with the starting credit.
pub(crate) async fn open_wallet(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
    credit: i64,
) -> Result<(), HandlerError> {
    store::open_wallet(conn, user_id, credit).await?;
    Ok(())
}

/// The payment for several reserved orders, decided: what [`debit`] found and
/// what it writes.
#[derive(Debug)]
pub(crate) struct Debits {
    /// One per charge, in the order given.
    pub(crate) decisions: Vec<Debit>,
    debited: store::Debited,
    payments: NewPayments,
}

impl Debits {
    /// Whether the decisions change anything.
    pub(crate) fn change(&self) -> bool {
        !self.payments.order_ids.is_empty()
    }
}

/// The payment for several reserved orders, one after another in the order
/// given, as [`domain::debit_in_turn`] decides on the wallets and payments
/// as read (without locks): [`write_debits`] writes it only if they are
/// still as read.
pub(crate) async fn debit(
    conn: &mut AsyncPgConnection,
    charges: &[Charge],
) -> Result<Debits, HandlerError> {
    let order_ids: Vec<Uuid> = charges.iter().map(|charge| charge.order_id.get()).collect();
    let mut user_ids: Vec<Uuid> = charges.iter().map(|charge| charge.user_id.get()).collect();
    user_ids.sort_unstable();
    user_ids.dedup();
    // Both reads in one round trip.
    let conn: &AsyncPgConnection = conn;
    let (mut decided, read) = tokio::try_join!(
        store::decided(conn, &order_ids),
        store::balances(conn, &user_ids)
    )?;
    let mut balances = read.clone();
    let decisions =
        domain::debit_in_turn(charges, &mut decided, &mut balances).map_err(step_failed)?;
    let mut payments = NewPayments::default();
    for (charge, debit) in charges.iter().zip(&decisions) {
        let Some(status) = debit.status() else {
            continue;
        };
        let reason = match debit {
            Debit::Declined(reason) => reason.clone(),
            _ => String::new(),
        };
        payments.order_ids.push(charge.order_id.get());
        payments.user_ids.push(charge.user_id.get());
        payments.amounts.push(charge.amount_cents);
        payments.statuses.push(status.as_str());
        payments.reasons.push(reason);
    }
    // In user order, the order every writer takes the wallets in.
    let mut debited = store::Debited::default();
    for user_id in user_ids {
        let user = UserId::from(user_id);
        if let (Some(&was), Some(&is)) = (read.get(&user), balances.get(&user))
            && was != is
        {
            debited.user_ids.push(user_id);
            debited.read.push(was);
            debited.balances.push(is);
        }
    }
    Ok(Debits {
        decisions,
        debited,
        payments,
    })
}

/// Writes what [`debit`] decided, with what the step carries, in one
/// statement; a serialization failure if a wallet or a payment changed since
/// it was read.
pub(crate) async fn write_debits(
    conn: &mut AsyncPgConnection,
    debits: &Debits,
    carried: &Carried,
) -> Result<(), HandlerError> {
    store::write_debits(conn, &debits.debited, &debits.payments, carried).await?;
    Ok(())
}

/// The refund of a cancelled order's capture, as
/// [`domain::refund`] decides. Returns the amount refunded.
pub(crate) async fn refund(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
    user_id: Uuid,
) -> Result<Option<i64>, HandlerError> {
    let payment = store::lock_payment(conn, order_id).await?;
    let status = payment
        .as_ref()
        .map(|(status, _, _)| PaymentStatus::parse(status))
        .transpose()
        .map_err(unknown_stored)?;
    match (domain::refund(status), payment) {
        (Refund::Refund, Some((_, amount, payer))) => {
            let balance = store::lock_balance(conn, payer).await?.ok_or_else(|| {
                HandlerError::permanent(format!("payment of order {order_id} has no wallet"))
            })?;
            let refunded = domain::refunded(payer.into(), balance, amount).map_err(step_failed)?;
            store::set_balance(conn, payer, refunded).await?;
            store::mark_refunded(conn, order_id).await?;
            Ok(Some(amount))
        }
        (Refund::Tombstone, _) => {
            store::insert_tombstone(conn, order_id, user_id).await?;
            Ok(None)
        }
        _ => Ok(None),
    }
}

/// The payment through a provider: the order's intent, PENDING, committed before
/// any call (a redelivery, or an order cancelled first, records nothing).
pub(crate) async fn record_intent(
    conn: &mut AsyncPgConnection,
    charge: &Charge,
) -> Result<(), HandlerError> {
    if charge.amount_cents < 1 {
        return Err(HandlerError::permanent(format!(
            "a provider charges a positive amount, not {}",
            charge.amount_cents
        )));
    }
    store::record_intents(
        conn,
        &[charge.order_id.get()],
        &[charge.user_id.get()],
        &[charge.amount_cents],
        pg_jetstream::telemetry::current().traceparent.as_deref(),
    )
    .await?;
    Ok(())
}

/// The refund through a provider, as [`domain::cancel_at_provider`]
/// decides: `true` when a refund became due.
pub(crate) async fn cancel_at_provider(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
    user_id: Uuid,
) -> Result<bool, HandlerError> {
    let standing = store::lock_standing(conn, order_id).await?;
    let status = standing
        .as_ref()
        .map(|standing| PaymentStatus::parse(&standing.status))
        .transpose()
        .map_err(unknown_stored)?;
    match (domain::cancel_at_provider(status), standing) {
        (ProviderCancel::Tombstone, _) => {
            store::insert_tombstone(conn, order_id, user_id).await?;
            Ok(false)
        }
        (ProviderCancel::RefundIfCaptured, _) => {
            store::request_cancel(conn, order_id).await?;
            Ok(false)
        }
        (ProviderCancel::Refund, Some(standing)) => {
            let id = standing.provider_payment_id.as_deref();
            store::settle(conn, order_id, PaymentStatus::Refunding, id, "").await?;
            Ok(true)
        }
        _ => Ok(false),
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

    use diesel::prelude::*;
    use diesel_async::RunQueryDsl;
    use shop_test_support::TestPostgres;

    use super::*;
    use crate::schema::{accounts, payments};

    /// The payment as its handler runs it, carrying nothing.
    async fn debit_and_write(
        conn: &mut AsyncPgConnection,
        charges: &[Charge],
    ) -> Result<Vec<Debit>, HandlerError> {
        let debits = debit(conn, charges).await?;
        if debits.change() {
            write_debits(conn, &debits, &Carried::nothing()).await?;
        }
        Ok(debits.decisions)
    }

    /// A fresh, migrated payment database and a connection to it.
    async fn migrated() -> (TestPostgres, AsyncPgConnection) {
        let postgres = TestPostgres::start().await;
        let url = postgres.create_database("payment").await;
        pg_jetstream::db::migrate(&url, vec![pg_jetstream::MIGRATIONS, crate::MIGRATIONS])
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
            order_id: order_id.into(),
            user_id: ann.into(),
            amount_cents: 100,
        };
        assert!(matches!(
            debit_and_write(&mut conn, &[charge]).await.unwrap()[..],
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
        assert_eq!(status, PaymentStatus::Captured.as_str());
        let balance: i64 = accounts::table
            .find(ann)
            .select(accounts::balance_cents)
            .first(&mut conn)
            .await
            .unwrap();
        assert_eq!(balance, i64::MAX - 10);
    }

    /// The payment reads without locks: a decision whose wallet or payment
    /// changed before its statement ran is refused whole, as a
    /// serialization failure (the consumer reads and decides again).
    #[tokio::test(flavor = "multi_thread")]
    async fn a_debit_decided_on_what_changed_since_writes_nothing() {
        let (_postgres, mut conn) = migrated().await;
        let ann = Uuid::now_v7();
        open_wallet(&mut conn, ann, 100).await.unwrap();
        let charge = Charge {
            order_id: Uuid::now_v7().into(),
            user_id: ann.into(),
            amount_cents: 60,
        };
        async fn balance(conn: &mut AsyncPgConnection, user_id: Uuid) -> QueryResult<i64> {
            accounts::table
                .find(user_id)
                .select(accounts::balance_cents)
                .first(conn)
                .await
        }
        async fn payments(conn: &mut AsyncPgConnection) -> QueryResult<i64> {
            payments::table.count().get_result(conn).await
        }

        // The wallet changed (a refund, a deposit) since it was read.
        let debits = debit(&mut conn, std::slice::from_ref(&charge))
            .await
            .unwrap();
        diesel::update(accounts::table.find(ann))
            .set(accounts::balance_cents.eq(70))
            .execute(&mut conn)
            .await
            .unwrap();
        let error = write_debits(&mut conn, &debits, &Carried::nothing())
            .await
            .unwrap_err();
        assert!(error.is_stale(), "{error}");
        assert_eq!(balance(&mut conn, ann).await.unwrap(), 70);
        assert_eq!(payments(&mut conn).await.unwrap(), 0);

        // The payment was decided meanwhile (by another replica).
        let debits = debit(&mut conn, std::slice::from_ref(&charge))
            .await
            .unwrap();
        diesel::insert_into(payments::table)
            .values((
                payments::order_id.eq(charge.order_id.get()),
                payments::user_id.eq(ann),
                payments::amount_cents.eq(60),
                payments::status.eq(PaymentStatus::Captured.as_str()),
                payments::reason.eq(""),
            ))
            .execute(&mut conn)
            .await
            .unwrap();
        let error = write_debits(&mut conn, &debits, &Carried::nothing())
            .await
            .unwrap_err();
        assert!(error.is_stale(), "{error}");
        assert_eq!(balance(&mut conn, ann).await.unwrap(), 70);
        assert_eq!(payments(&mut conn).await.unwrap(), 1);

        // Read again: decided already, nothing to write.
        let debits = debit(&mut conn, &[charge]).await.unwrap();
        assert!(!debits.change());
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
        let charge = |user_id: Uuid, amount_cents| Charge {
            order_id: Uuid::now_v7().into(),
            user_id: user_id.into(),
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
        let decisions = debit_and_write(&mut conn, &charges).await.unwrap();
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
        let decisions = debit_and_write(&mut conn, &charges).await.unwrap();
        assert!(
            decisions
                .iter()
                .all(|decision| matches!(decision, Debit::AlreadyDecided))
        );
        // A wallet not opened yet: the call fails to be retried, and
        // records nothing.
        let error = debit_and_write(&mut conn, &[charge(Uuid::now_v7(), 1)])
            .await
            .unwrap_err();
        assert!(matches!(error, HandlerError::Retryable(_)), "{error}");
        let payments: i64 = payments::table.count().get_result(&mut conn).await.unwrap();
        assert_eq!(payments, 4);
    }
}
