//! The operator's dead-letter tools against real NATS and PostgreSQL: a
//! replay reaches the consumer that gave up and no other, and a replay that
//! fails again comes back as a new dead letter.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use pg_jetstream::envelope::headers;
use pg_jetstream::{
    dead_letters::{DeadLetterError, DeadLetters},
    provision::ConsumerSpec,
};
use tokio_util::sync::CancellationToken;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(20);

fn deliveries(behaviour: &Behaviour, order_id: &str) -> usize {
    behaviour
        .deliveries
        .lock()
        .unwrap()
        .get(order_id)
        .map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_reaches_only_the_consumer_that_gave_up() {
    let setup = setup().await;
    // Two services consume ORDER; only inventory refuses `o-1`, for now.
    let inventory = Arc::new(Behaviour::default());
    inventory.permanent.lock().unwrap().push("o-1".into());
    let payment = Arc::new(Behaviour::default());
    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut inventory_stats = None;
    for (name, behaviour) in [("inventory", &inventory), ("payment", &payment)] {
        let live = consumer_on(
            &setup,
            ConsumerSpec::new(name, "ORDER", &[]),
            Arc::clone(behaviour),
        );
        if name == "inventory" {
            inventory_stats = Some(live.stats());
        }
        let replays = consumer_on(&setup, ConsumerSpec::replays(name), Arc::clone(behaviour));
        tasks.push(tokio::spawn(live.run(shutdown.clone())));
        tasks.push(tokio::spawn(replays.run(shutdown.clone())));
    }
    let inventory_stats = inventory_stats.unwrap();
    append(&setup, &[placed("o-1"), placed("o-2")]).await;
    relay(&setup).sweep_once().await.unwrap();
    eventually("o-1 dead-lettered by inventory", WAIT, || async {
        inventory_stats.dead_lettered.load(Ordering::Relaxed) == 1
    })
    .await;
    eventually("payment applied both", WAIT, || async {
        effects(&setup, "o-1").await == 1 && effects(&setup, "o-2").await == 2
    })
    .await;

    let queue = DeadLetters::open(setup.js.clone()).await.unwrap();
    let letters = queue.list().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.consumer, "inventory");
    assert_eq!(letter.subject, "order.placed");
    assert_eq!(letter.stream, "ORDER");
    assert_eq!(letter.stream_sequence, 1);
    assert_eq!(letter.deliveries, 1);
    assert_eq!(letter.reason, "order o-1 is not acceptable");
    assert_eq!(letter.header(headers::CORRELATION_ID), Some("o-1"));
    let shown = queue.get(letter.sequence).await.unwrap();
    assert_eq!(shown.body, letter.body);
    assert!(
        shown
            .original_headers()
            .iter()
            .all(|(name, _)| !AsRef::<str>::as_ref(name).starts_with("dlq-")),
        "a replay carries the original headers only"
    );

    // The cause is fixed; the replay reaches inventory, and payment, which
    // applied the event the first time, does not see it again.
    inventory.permanent.lock().unwrap().clear();
    queue.replay(letter.sequence).await.unwrap();
    eventually("inventory applied the replay", WAIT, || async {
        effects(&setup, "o-1").await == 2
    })
    .await;
    assert!(queue.list().await.unwrap().is_empty(), "replayed, so gone");
    assert!(matches!(
        queue.replay(letter.sequence).await,
        Err(DeadLetterError::NotFound(_))
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(deliveries(&payment, "o-1"), 1);
    let replays = setup.js.get_stream("REPLAY").await.unwrap();
    let payment_replays = replays.consumer_info("payment").await.unwrap();
    assert_eq!(payment_replays.delivered.stream_sequence, 0);
    assert_eq!(payment_replays.num_pending, 0);

    // A replay that fails again is a new dead letter under the first subject.
    inventory.permanent.lock().unwrap().push("o-3".into());
    append(&setup, &[placed("o-3")]).await;
    relay(&setup).sweep_once().await.unwrap();
    eventually("o-3 dead-lettered", WAIT, || async {
        queue.list().await.unwrap().len() == 1
    })
    .await;
    let first = queue.list().await.unwrap().remove(0);
    queue.replay(first.sequence).await.unwrap();
    eventually("the replay dead-lettered again", WAIT, || async {
        let letters = queue.list().await.unwrap();
        letters.len() == 1 && letters[0].sequence != first.sequence
    })
    .await;
    let again = queue.list().await.unwrap().remove(0);
    assert_eq!(again.subject, "order.placed");
    assert_eq!(again.stream, "REPLAY");
    assert_eq!(again.consumer, "inventory");
    assert_eq!(again.header(headers::ID), first.header(headers::ID));
    assert_eq!(again.body, first.body);
    assert_eq!(effects(&setup, "o-3").await, 1, "payment's effect only");

    queue.delete(again.sequence).await.unwrap();
    assert!(queue.list().await.unwrap().is_empty());
    let twice = queue.delete(again.sequence).await;
    assert!(
        matches!(twice, Err(DeadLetterError::NotFound(_))),
        "{twice:?}"
    );
    shutdown.cancel();
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_queue_lists_nothing_and_a_missing_one_says_so() {
    let setup = setup().await;
    let queue = DeadLetters::open(setup.js.clone()).await.unwrap();
    assert!(queue.list().await.unwrap().is_empty());
    assert!(matches!(
        queue.get(7).await,
        Err(DeadLetterError::NotFound(7))
    ));
    setup.js.delete_stream("DLQ").await.unwrap();
    assert!(matches!(
        DeadLetters::open(setup.js.clone()).await,
        Err(DeadLetterError::NoStream(stream)) if stream == "DLQ"
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_queue_is_read_a_page_at_a_time_and_by_consumer() {
    use pg_jetstream::consumer::dead_letter_headers as dlq;
    let setup = setup().await;
    // 25 dead letters, inventory's and payment's interleaved.
    for i in 0..25u64 {
        let consumer = if i % 5 < 3 { "inventory" } else { "payment" };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(dlq::CONSUMER, consumer);
        headers.insert(dlq::SUBJECT, "order.placed");
        headers.insert(dlq::STREAM, "ORDER");
        headers.insert(dlq::STREAM_SEQUENCE, (i + 1).to_string().as_str());
        headers.insert(dlq::DELIVERIES, "1");
        headers.insert(dlq::REASON, format!("reason {i}").as_str());
        setup
            .js
            .publish_with_headers(
                format!("dlq.{consumer}.order.placed"),
                headers,
                "body".into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let queue = DeadLetters::open(setup.js.clone()).await.unwrap();

    let mut seen = Vec::new();
    let mut pages = 0;
    let mut from = 1;
    loop {
        let page = queue.page(from, 10, None).await.unwrap();
        assert!(page.letters.len() <= 10);
        pages += 1;
        seen.extend(page.letters.iter().map(|letter| letter.sequence));
        match page.next {
            Some(next) => from = next,
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, (1..=25).collect::<Vec<u64>>(), "each once, in order");

    let payment = queue.page(1, 4, Some("payment")).await.unwrap();
    let sequences: Vec<u64> = payment.letters.iter().map(|l| l.sequence).collect();
    assert_eq!(sequences, [4, 5, 9, 10]);
    assert!(payment.letters.iter().all(|l| l.consumer == "payment"));
    assert_eq!(payment.next, Some(14));
    let rest = queue.page(14, 100, Some("payment")).await.unwrap();
    assert_eq!(rest.letters.len(), 6);
    assert_eq!(rest.next, None);
    assert_eq!(queue.list().await.unwrap().len(), 25);
}
