//! Events through the whole pipeline against real servers: a writer's
//! transaction appends to the outbox, the writer publishes to JetStream after
//! its commit, the consumer applies the event in another database with its
//! inbox row.
//!
//! Reports events/s from the first commit to the last applied event, and the
//! hop latency from each writer's commit to the consumer's commit.
//!
//! ```sh
//! cargo bench -p pg-jetstream --bench pipeline -- --events 20000 --writers 16 --per-tx 1
//! ```
//!
//! PostgreSQL runs with fsync on (a durable cluster from the test harness);
//! the producing and consuming services have a database each, as in the
//! deployed system.

#![allow(clippy::print_stdout)] // the report is the program's output

#[path = "../tests/runtime/events.rs"]
#[allow(dead_code)]
mod events;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use diesel_async::{AsyncConnection as _, AsyncPgConnection};
use events::OrderPlaced;
use hdrhistogram::Histogram;
use pg_jetstream::{
    Context, Handler, HandlerError, Outbox, Route, Router,
    consumer::{EventConsumer, Processed},
    envelope::OutgoingEvent,
    outbox::{Relay, RelayConfig},
    provision::{ConsumerSpec, StreamSpec},
};
use shop_test_support::{TestNats, TestPostgres};
use tokio_util::sync::CancellationToken;

struct Options {
    events: usize,
    writers: usize,
    per_transaction: usize,
    rate: Option<f64>,
    concurrency: usize,
    batch: usize,
}

fn options() -> Options {
    let mut options = Options {
        events: 20_000,
        writers: 16,
        per_transaction: 1,
        rate: None,
        concurrency: 4,
        batch: 64,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--events" => options.events = value(&mut args, arg),
            "--writers" => options.writers = value(&mut args, arg),
            "--per-tx" => options.per_transaction = value(&mut args, arg),
            "--rate" => options.rate = Some(value(&mut args, arg)),
            "--concurrency" => options.concurrency = value(&mut args, arg),
            "--batch" => options.batch = value(&mut args, arg),
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            other => usage(other),
        }
    }
    options
}

fn value<T: std::str::FromStr>(args: &mut std::slice::Iter<'_, String>, arg: &str) -> T {
    args.next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| usage(arg))
}

fn usage(arg: &str) -> ! {
    eprintln!(
        "unexpected argument {arg}; usage: pipeline [--events N] [--writers N] [--per-tx N] [--rate EVENTS_PER_S] [--concurrency N] [--batch N]"
    );
    std::process::exit(2)
}

/// Does nothing: the runtime's own work is what is measured (inbox row,
/// commit, ack).
struct Apply;

impl Handler<OrderPlaced> for Apply {
    async fn handle(&self, _: &mut Context<'_>, _: OrderPlaced) -> Result<(), HandlerError> {
        Ok(())
    }
}

#[tokio::main]
async fn main() {
    let options = options();
    let (nats, postgres) = tokio::join!(TestNats::start(), TestPostgres::start_durable());
    let producer_url = postgres.create_database("producer").await;
    let consumer_url = postgres.create_database("consumer").await;
    for url in [&producer_url, &consumer_url] {
        pg_jetstream::db::migrate(url, vec![pg_jetstream::MIGRATIONS])
            .await
            .expect("migrations apply");
    }
    let js = jetstream::new(nats.client().await);
    StreamSpec::new("ORDER", "order")
        .provision(&js)
        .await
        .expect("stream");
    StreamSpec::dead_letters()
        .provision(&js)
        .await
        .expect("dead-letter stream");

    let origin = Instant::now();
    let nanos =
        move |at: Instant| u64::try_from(at.duration_since(origin).as_nanos()).unwrap_or(u64::MAX);
    let committed: Arc<Vec<AtomicU64>> =
        Arc::new((0..options.events).map(|_| AtomicU64::new(0)).collect());
    let applied: Arc<Vec<AtomicU64>> =
        Arc::new((0..options.events).map(|_| AtomicU64::new(0)).collect());
    let applied_count = Arc::new(AtomicU64::new(0));

    let shutdown = CancellationToken::new();
    let producer_pool = pg_jetstream::db::pool(&producer_url, 32).expect("pool");
    // The writers publish after their commits, as a service's use cases do.
    let outbox = Outbox::new("example/bench").publishing_to(js.clone());
    let relay =
        Relay::new(producer_pool, js.clone(), RelayConfig::default()).forgetting_for(&outbox);
    let relay = tokio::spawn(relay.run(shutdown.clone()));

    let hook = {
        let applied = Arc::clone(&applied);
        let applied_count = Arc::clone(&applied_count);
        Arc::new(
            move |message: &jetstream::Message, processed: Processed, _: Duration| {
                if processed != Processed::Applied {
                    return;
                }
                let index = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(pg_jetstream::envelope::headers::CORRELATION_ID))
                    .and_then(|id| id.as_str().parse::<usize>().ok());
                if let Some(index) = index {
                    applied[index].store(nanos(Instant::now()), Ordering::Relaxed);
                    applied_count.fetch_add(1, Ordering::Relaxed);
                }
            },
        )
    };
    let consumer = EventConsumer::new(
        js.clone(),
        pg_jetstream::db::pool(&consumer_url, options.concurrency).expect("pool"),
        Outbox::new("example/bench"),
        ConsumerSpec::new("bench", "ORDER", &[]),
        Router::new().on::<OrderPlaced>(Route::single()),
        Apply,
    )
    .with_concurrency(options.concurrency)
    .with_batch_size(options.batch)
    .with_hook(hook);
    let consumer = tokio::spawn(consumer.run(shutdown.clone()));

    eprintln!(
        "pipeline: {} events, {} writers committing {} per transaction at {}, consumer: {} batches of up to {}",
        options.events,
        options.writers,
        options.per_transaction,
        options
            .rate
            .map_or("full speed".to_owned(), |rate| format!("{rate} events/s")),
        options.concurrency,
        options.batch
    );
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..options.writers)
        .map(|_| {
            let url = producer_url.clone();
            let next = Arc::clone(&next);
            let committed = Arc::clone(&committed);
            let total = options.events as u64;
            let per_transaction = options.per_transaction as u64;
            let rate = options.rate;
            let outbox = outbox.clone();
            tokio::spawn(async move {
                let mut conn = AsyncPgConnection::establish(&url).await.expect("connect");
                loop {
                    let first = next.fetch_add(per_transaction, Ordering::Relaxed);
                    if first >= total {
                        break;
                    }
                    if let Some(rate) = rate {
                        // A fixed arrival rate: event i is due at i / rate.
                        let due = started + Duration::from_secs_f64(first as f64 / rate);
                        tokio::time::sleep_until(due.into()).await;
                    }
                    let indices = first..(first + per_transaction).min(total);
                    let events: Vec<_> = indices
                        .clone()
                        .map(|index| {
                            OutgoingEvent::new(&OrderPlaced {
                                order_id: index.to_string(),
                                ..Default::default()
                            })
                            .correlated(index.to_string())
                        })
                        .collect();
                    let appending = outbox.clone();
                    let written = conn
                        .transaction::<_, diesel::result::Error, _>(async move |conn| {
                            appending.append(conn, events).await
                        })
                        .await
                        .expect("append");
                    outbox.publish(written).await.expect("publish");
                    let now = nanos(Instant::now());
                    for index in indices {
                        committed[index as usize].store(now, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    let written = started.elapsed();
    while applied_count.load(Ordering::Relaxed) < options.events as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    shutdown.cancel();
    let _ = tokio::join!(relay, consumer);

    let mut hops = Histogram::<u64>::new(3).expect("histogram");
    for (commit, apply) in committed.iter().zip(applied.iter()) {
        let (commit, apply) = (
            commit.load(Ordering::Relaxed),
            apply.load(Ordering::Relaxed),
        );
        // The writer notes its commit after the call returns, so a very fast
        // hop can be recorded as slightly negative: count it as zero.
        hops.record(apply.saturating_sub(commit) / 1000)
            .expect("record");
    }
    let rate = options.events as f64 / elapsed.as_secs_f64();
    let ms = |q: f64| hops.value_at_quantile(q) as f64 / 1000.0;
    println!("events               {}", options.events);
    println!(
        "written in           {:.2} s ({:.0} events/s)",
        written.as_secs_f64(),
        options.events as f64 / written.as_secs_f64()
    );
    println!("all applied in       {:.2} s", elapsed.as_secs_f64());
    println!("throughput           {rate:.0} events/s");
    println!("hop latency (commit -> consumer commit)");
    println!(
        "  p50 {:.2} ms   p90 {:.2} ms   p99 {:.2} ms   max {:.2} ms",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        hops.max() as f64 / 1000.0
    );
}
