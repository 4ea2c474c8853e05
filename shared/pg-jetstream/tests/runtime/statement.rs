//! Routes in one statement: a batch applied by one statement that carries
//! its inbox rows and events and commits by itself; a redelivery refused by
//! the inbox; a stale read read and decided again; a failure settled for
//! its own event; a batch's transaction failing after its statement
//! committed fails only its own messages; a saga's messages applied in the
//! order they came across the two halves.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::events::{OrderConfirmed, OrderPlaced};
use diesel::sql_types::{Array, BigInt, Text, Uuid as SqlUuid};
use diesel_async::{AsyncConnection as _, AsyncPgConnection, SimpleAsyncConnection as _};
use pg_jetstream::{
    HandlerError, Route, Router,
    consumer::{EventConsumer, Statement, StatementHandler},
    provision::ConsumerSpec,
};
use tokio_util::sync::CancellationToken;

use crate::common::*;

#[derive(diesel::QueryableByName)]
struct Available {
    #[diesel(sql_type = BigInt)]
    available: i64,
}

/// The lamps the handler read still there, `$2` of them taken with the
/// effects of their events (`$3`, `$4`), the inbox rows and the events.
const TAKE: &str = "\
WITH taken AS (
    UPDATE stock SET available = $1 - $2 WHERE sku = 'LAMP' AND available = $1
    RETURNING 1),
checked AS (SELECT stale_unless(EXISTS (SELECT FROM taken), 'stock') AS holds),
effects AS (
    INSERT INTO effects (event_id, order_id)
    SELECT event.id, event.order_id
    FROM checked, unnest($3::uuid[], $4::text[]) AS event (id, order_id)
    RETURNING 1),
carried AS (SELECT inbox_write($5, $6::uuid[]), outbox_write($7::jsonb) FROM checked)
SELECT (SELECT count(*) FROM effects), (SELECT count(*) FROM carried)";

/// Takes a lamp for each event while there are any: the events that got
/// one are confirmed; reads the stock without a lock and writes once.
impl StatementHandler<OrderPlaced> for Behaviour {
    async fn handle_in_statement(
        &self,
        step: &mut Statement<'_>,
        events: Vec<OrderPlaced>,
    ) -> Result<(), HandlerError> {
        self.batch_sizes.lock().unwrap().push(events.len());
        self.pass_gates(&events).await;
        self.refuse(&events)?;
        let available = diesel_async::RunQueryDsl::get_result::<Available>(
            diesel::sql_query("SELECT available FROM stock WHERE sku = 'LAMP'"),
            step.conn(),
        )
        .await?
        .available;
        let interloper = {
            let mut left = self.interlopers.lock().unwrap();
            let comes = *left > 0;
            *left = left.saturating_sub(1);
            comes
        };
        if interloper {
            // Another writer, committed between the read and the write.
            diesel_async::RunQueryDsl::execute(
                diesel::sql_query("UPDATE stock SET available = available - 1 WHERE sku = 'LAMP'"),
                step.conn(),
            )
            .await?;
        }
        let taken = events.len().min(usize::try_from(available).unwrap_or(0));
        if taken == 0 {
            return Ok(());
        }
        for (index, event) in events.iter().enumerate().take(taken) {
            step.emit(
                index,
                &OrderConfirmed {
                    order_id: event.order_id.clone(),
                    ..Default::default()
                },
            );
        }
        let ids: Vec<uuid::Uuid> = (0..taken).map(|index| step.envelope(index).id).collect();
        let orders: Vec<&str> = events[..taken]
            .iter()
            .map(|event| event.order_id.as_str())
            .collect();
        let carried = step.carry();
        let take = diesel::sql_query(TAKE)
            .bind::<BigInt, _>(available)
            .bind::<BigInt, _>(i64::try_from(taken).unwrap())
            .bind::<Array<SqlUuid>, _>(&ids)
            .bind::<Array<Text>, _>(&orders)
            .bind::<Text, _>(carried.consumer())
            .bind::<Array<SqlUuid>, _>(carried.event_ids())
            .bind::<Text, _>(carried.events_json());
        diesel_async::RunQueryDsl::execute(take, step.conn()).await?;
        Ok(())
    }
}

async fn stock(setup: &Setup, lamps: i64) {
    let mut conn = AsyncPgConnection::establish(&setup.url).await.unwrap();
    conn.batch_execute(&format!(
        "UPDATE stock SET available = {lamps} WHERE sku = 'LAMP'"
    ))
    .await
    .unwrap();
}

async fn lamps(setup: &Setup) -> i64 {
    count(
        &setup.url,
        "SELECT available AS n FROM stock WHERE sku = 'LAMP'",
    )
    .await
}

async fn inbox_rows(setup: &Setup) -> i64 {
    count(&setup.url, "SELECT count(*) AS n FROM inbox").await
}

fn statement_consumer(setup: &Setup, behaviour: &Arc<Behaviour>) -> EventConsumer<Arc<Behaviour>> {
    consumer_with(
        setup,
        ConsumerSpec::new("inventory", "ORDER", &["order.placed"]),
        Router::new().on::<OrderPlaced>(Route::in_one_statement()),
        Arc::clone(behaviour),
    )
    .with_concurrency(1)
    .with_batch_size(64)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_in_one_statement_writes_a_batch_with_its_inbox_rows_and_events() {
    let setup = setup().await;
    stock(&setup, 3).await;
    let behaviour = Arc::new(Behaviour::default());
    let consumer = statement_consumer(&setup, &behaviour);
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let (task, ids) = delivered_together(
        &setup,
        &behaviour,
        "gate",
        || tokio::spawn(consumer.run(shutdown.clone())),
        async || append(&setup, &[placed("a"), placed("b"), placed("c")]).await,
    )
    .await;
    eventually("gate, a, b and c handled", WAIT, || async {
        stats.applied.load(Ordering::Relaxed) == 4
    })
    .await;
    assert_eq!(*behaviour.batch_sizes.lock().unwrap(), [1, 3]);
    // The gate took a lamp, a and b the others; c found none.
    assert_eq!(lamps(&setup).await, 0);
    for (order, expected) in [("gate", 1), ("a", 1), ("b", 1), ("c", 0)] {
        assert_eq!(effects(&setup, order).await, expected, "{order}");
    }
    // Every event has its inbox row, c's written by the consumer since
    // its handler changed nothing; each confirmation is caused by its own
    // event.
    assert_eq!(inbox_rows(&setup).await, 4);
    let confirmed = causes(&setup).await;
    assert_eq!(
        confirmed[1..],
        [(ids[0], "a".to_owned()), (ids[1], "b".to_owned())]
    );

    // A redelivery of a (under another JetStream id): its inbox row refuses
    // the statement, and it is settled as a duplicate, with no effect.
    republish(&setup, 2, "a-again", None).await;
    eventually("a's copy settled", WAIT, || async {
        stats.duplicates.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(effects(&setup, "a").await, 1);
    assert_eq!(inbox_rows(&setup).await, 4);
    assert_eq!(stats.applied.load(Ordering::Relaxed), 4);
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_read_is_read_and_decided_again() {
    let setup = setup().await;
    stock(&setup, 5).await;
    let behaviour = Arc::new(Behaviour::default());
    *behaviour.interlopers.lock().unwrap() = 1;
    let consumer = statement_consumer(&setup, &behaviour);
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    append(&setup, &[placed("a")]).await;
    relay(&setup).sweep_once().await.unwrap();
    eventually("a applied", WAIT, || async {
        stats.applied.load(Ordering::Relaxed) == 1
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();
    // Read 5, the interloper took one, the write found 4: refused, read
    // again (4) and written: 3 left, a's effect once. Written without the
    // check, a would have set 5 - 1 and lost the interloper's lamp.
    assert_eq!(*behaviour.batch_sizes.lock().unwrap(), [1, 1]);
    assert_eq!(lamps(&setup).await, 3);
    assert_eq!(effects(&setup, "a").await, 1);
    assert_eq!(inbox_rows(&setup).await, 1);
    assert_eq!(stats.batches_tried_again.load(Ordering::Relaxed), 0);
    assert_eq!(stats.stale_retries.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failure_in_a_statement_batch_is_settled_for_its_own_event() {
    let setup = setup().await;
    stock(&setup, 10).await;
    let behaviour = Arc::new(Behaviour::default());
    behaviour.permanent.lock().unwrap().push("bad".into());
    let consumer = statement_consumer(&setup, &behaviour);
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let (task, _) = delivered_together(
        &setup,
        &behaviour,
        "gate",
        || tokio::spawn(consumer.run(shutdown.clone())),
        async || append(&setup, &[placed("d"), placed("bad"), placed("e")]).await,
    )
    .await;
    eventually("bad dead-lettered", WAIT, || async {
        stats.dead_lettered.load(Ordering::Relaxed) == 1
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();
    assert_eq!(*behaviour.batch_sizes.lock().unwrap(), [1, 3, 1, 1, 1]);
    assert_eq!(stats.applied.load(Ordering::Relaxed), 3);
    assert_eq!(effects(&setup, "d").await, 1);
    assert_eq!(effects(&setup, "e").await, 1);
    assert_eq!(effects(&setup, "bad").await, 0);
    assert_eq!(lamps(&setup).await, 7);
    // No inbox row for the dead letter: nothing of it was written.
    assert_eq!(inbox_rows(&setup).await, 3);
    assert_eq!(dead_letters(&setup, 1).await.len(), 1);
}

/// Records a confirmation's effect, in the batch's transaction.
impl pg_jetstream::Handler<OrderConfirmed> for Behaviour {
    async fn handle(
        &self,
        cx: &mut pg_jetstream::Context<'_>,
        event: OrderConfirmed,
    ) -> Result<(), HandlerError> {
        let before =
            diesel::sql_query("SELECT count(*) AS available FROM effects WHERE order_id = $1")
                .bind::<Text, _>(&event.order_id);
        let before = diesel_async::RunQueryDsl::get_result::<Available>(before, cx.conn())
            .await?
            .available;
        self.seen_by_confirmations
            .lock()
            .unwrap()
            .push((event.order_id.clone(), before));
        let insert = diesel::sql_query("INSERT INTO effects (event_id, order_id) VALUES ($1, $2)")
            .bind::<SqlUuid, _>(cx.envelope().id)
            .bind::<Text, _>(event.order_id);
        diesel_async::RunQueryDsl::execute(insert, cx.conn()).await?;
        Ok(())
    }
}

/// The two routes of the tests below: `order.placed` in one statement,
/// `order.confirmed` in the batch's transaction.
fn two_halves(setup: &Setup, behaviour: &Arc<Behaviour>) -> EventConsumer<Arc<Behaviour>> {
    consumer_with(
        setup,
        ConsumerSpec::new("inventory", "ORDER", &["order.placed", "order.confirmed"]),
        Router::new()
            .on::<OrderPlaced>(Route::in_one_statement())
            .on::<OrderConfirmed>(Route::single()),
        Arc::clone(behaviour),
    )
    .with_concurrency(1)
    .with_batch_size(64)
}

fn confirmed(order_id: &str) -> pg_jetstream::envelope::OutgoingEvent {
    pg_jetstream::envelope::OutgoingEvent::new(&OrderConfirmed {
        order_id: order_id.into(),
        ..Default::default()
    })
    .correlated(order_id)
}

/// Within one batch, a message of a saga in the transaction comes before
/// one of the same saga in a statement (a cancellation that overtook the
/// order it cancels): they are applied in that order, the statement after
/// the transaction has committed. Another saga's message in a statement is
/// not held back.
#[tokio::test(flavor = "multi_thread")]
async fn a_statement_message_that_came_after_its_saga_s_transaction_message_is_applied_after_it() {
    let setup = setup().await;
    stock(&setup, 10).await;
    let behaviour = Arc::new(Behaviour::default());
    let consumer = two_halves(&setup, &behaviour);
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let (task, _) = delivered_together(
        &setup,
        &behaviour,
        "gate",
        || tokio::spawn(consumer.run(shutdown.clone())),
        async || {
            append(
                &setup,
                &[confirmed("a"), placed("a"), placed("b"), confirmed("b")],
            )
            .await
        },
    )
    .await;
    eventually("gate, a and b handled", WAIT, || async {
        stats.applied.load(Ordering::Relaxed) == 5
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();
    // a's confirmation came first and saw nothing of a; b's placement came
    // first and was applied first, in the statement before the transaction.
    assert_eq!(
        *behaviour.seen_by_confirmations.lock().unwrap(),
        [("a".to_owned(), 0), ("b".to_owned(), 1)]
    );
    assert_eq!(effects(&setup, "a").await, 2);
    // The gate's batch, then b's placement, then a's after the transaction.
    assert_eq!(*behaviour.batch_sizes.lock().unwrap(), [1, 1, 1]);
}

/// One batch, two halves: `order.placed` goes in one statement, which
/// commits by itself, then `order.confirmed` in the batch's transaction,
/// which fails for a reason of its own (its inbox row refused). The placed
/// event was applied: it is acknowledged as such, not counted as a failed
/// attempt nor redelivered; only the confirmation is tried again.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_applied_in_a_statement_is_not_failed_with_the_transaction_after_it() {
    let setup = setup().await;
    stock(&setup, 10).await;
    let behaviour = Arc::new(Behaviour::default());
    let consumer = two_halves(&setup, &behaviour);
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let (task, ids) = delivered_together(
        &setup,
        &behaviour,
        "gate",
        || tokio::spawn(consumer.run(shutdown.clone())),
        async || {
            let ids = append(&setup, &[placed("a"), confirmed("x")]).await;
            let mut conn = AsyncPgConnection::establish(&setup.url).await.unwrap();
            conn.batch_execute(&format!(
                "CREATE FUNCTION refuse_inbox_row() RETURNS trigger LANGUAGE plpgsql AS $$ \
                 BEGIN IF NEW.event_id = '{}' THEN RAISE EXCEPTION 'the test refuses this inbox row'; \
                 END IF; RETURN NEW; END $$; \
                 CREATE TRIGGER refuse BEFORE INSERT ON inbox \
                 FOR EACH ROW EXECUTE FUNCTION refuse_inbox_row();",
                ids[1]
            ))
            .await
            .unwrap();
            ids
        },
    )
    .await;
    eventually("the confirmation refused twice", WAIT, || async {
        count(
            &setup.url,
            "SELECT coalesce(sum(failures), 0)::bigint AS n FROM consumer_failures",
        )
        .await
            >= 2
    })
    .await;
    // The placed event was applied once, and no attempt of it failed.
    assert_eq!(effects(&setup, "a").await, 1);
    let placed_failures = count(
        &setup.url,
        &format!(
            "SELECT count(*) AS n FROM consumer_failures WHERE event_id = '{}'",
            ids[0]
        ),
    )
    .await;
    assert_eq!(placed_failures, 0, "the applied message counted as failed");
    assert_eq!(
        stats.duplicates.load(Ordering::Relaxed),
        0,
        "a was redelivered"
    );

    // The inbox takes the confirmation again: it goes through, once.
    let mut conn = AsyncPgConnection::establish(&setup.url).await.unwrap();
    conn.batch_execute("DROP TRIGGER refuse ON inbox")
        .await
        .unwrap();
    eventually("the confirmation applied", WAIT, || async {
        effects(&setup, "x").await == 1
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();
    assert_eq!(effects(&setup, "a").await, 1);
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 0);
}
