//! The HTTP port under hundreds of scrapes and readiness probes at once,
//! while sagas run: the database queries they cause stay bounded (counted
//! by pg_stat_statements), the requests beyond the port's concurrency are
//! answered 503 at once, the kubelet's own probes all pass, and the sagas
//! end as they would without them.

use shop_integration_tests::shop;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use diesel::QueryableByName;
use diesel::sql_types::BigInt;
use diesel_async::{AsyncConnection as _, AsyncPgConnection, SimpleAsyncConnection as _};
use shop::{Settings, Shop};
use shop_proto::order::v1::OrderStatus;
use shop_service::{METRICS_CONCURRENCY, PROBE_CONCURRENCY, READY_FRESH, SAMPLE_EVERY};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SCRAPERS: usize = 300;
/// Of them, how many probe `/readyz` (the rest scrape `/metrics`).
const PROBERS: usize = 48;

/// One `GET path`; the status code, or 0 when the connection failed.
async fn get(addr: std::net::SocketAddr, path: &str) -> u16 {
    let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await else {
        return 0;
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n");
    if tcp.write_all(request.as_bytes()).await.is_err() {
        return 0;
    }
    let mut response = Vec::new();
    let _ = tcp.read_to_end(&mut response).await;
    String::from_utf8_lossy(&response)
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

#[derive(QueryableByName)]
struct Calls {
    #[diesel(sql_type = BigInt)]
    calls: i64,
}

/// How often statements whose text matches `pattern` ran in `url`'s
/// database since the last reset.
async fn calls(conn: &mut AsyncPgConnection, pattern: &str) -> i64 {
    // In scope here only: it would take over the atomics' `load`.
    use diesel_async::RunQueryDsl as _;
    diesel::sql_query(
        "SELECT coalesce(sum(calls), 0)::bigint AS calls FROM pg_stat_statements
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND query ILIKE $1",
    )
    .bind::<diesel::sql_types::Text, _>(pattern)
    .get_result::<Calls>(conn)
    .await
    .unwrap()
    .calls
}

#[tokio::test(flavor = "multi_thread")]
async fn scrapes_and_probes_by_the_hundred_cost_the_saga_nothing() {
    let mut shop = Shop::start(Settings {
        saga_deadline: Duration::from_secs(10),
        postgres: vec!["shared_preload_libraries=pg_stat_statements".into()],
        ..Settings::default()
    })
    .await;
    let user = shop.create_user("scraped@example.com").await;
    shop.create_product("LAMP", 100, 1000).await;
    let mut stats = AsyncPgConnection::establish(&shop.infra.postgres.url("shop_order"))
        .await
        .unwrap();
    stats
        .batch_execute("CREATE EXTENSION pg_stat_statements; SELECT pg_stat_statements_reset()")
        .await
        .unwrap();

    let http = shop.http_addr("order");
    let done = Arc::new(AtomicBool::new(false));
    let (ok, busy, other) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let started = Instant::now();
    let scrapers: Vec<_> = (0..SCRAPERS)
        .map(|index| {
            let (done, ok, busy, other) = (
                Arc::clone(&done),
                Arc::clone(&ok),
                Arc::clone(&busy),
                Arc::clone(&other),
            );
            // Most scrape; fewer probe than the probes' own slots, so that
            // the kubelet below always finds one free.
            let path = if index < PROBERS {
                "/readyz"
            } else {
                "/metrics"
            };
            tokio::spawn(async move {
                while !done.load(Ordering::Relaxed) {
                    match get(http, path).await {
                        200 => &ok,
                        503 => &busy,
                        _ => &other,
                    }
                    .fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    // The kubelet: a readiness probe every 100 ms, each answered 200
    // however many scrape.
    let kubelet = {
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut answers = Vec::new();
            while !done.load(Ordering::Relaxed) {
                answers.push(get(http, "/readyz").await);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            answers
        })
    };

    // Sagas, one after another, while the port is hammered.
    for n in 0..20 {
        let order = shop
            .place(&user, &[("LAMP", 1)], &format!("scraped-{n}"))
            .await
            .unwrap();
        let order = shop.settled(&order.order_id).await;
        assert_eq!(order.status(), OrderStatus::Confirmed, "{:?}", order.steps);
    }
    done.store(true, Ordering::Relaxed);
    for scraper in scrapers {
        scraper.await.unwrap();
    }
    let probed = kubelet.await.unwrap();
    assert!(
        !probed.is_empty() && probed.iter().all(|code| *code == 200),
        "the kubelet's probes: {probed:?}"
    );
    let seconds = started.elapsed().as_secs_f64();
    let backlog = calls(&mut stats, "%count(*), min(%outbox%").await;
    let readiness = calls(&mut stats, "SELECT $1").await;
    let (ok, busy, other) = (
        ok.load(Ordering::Relaxed),
        busy.load(Ordering::Relaxed),
        other.load(Ordering::Relaxed),
    );
    eprintln!(
        "{seconds:.1} s: {ok} answered, {busy} busy (over {METRICS_CONCURRENCY} scrapes or \
         {PROBE_CONCURRENCY} probes at once), \
         {other} other; {backlog} backlog counts, {readiness} readiness queries"
    );
    assert!(ok > 100, "{ok} answered");
    assert_eq!(other, 0, "every request answered 200 or 503");
    // At most one sample per SAMPLE_EVERY, one check per READY_FRESH plus
    // the gRPC health's every 5 s, each with one to spare.
    let most = |every: Duration| (seconds / every.as_secs_f64()).ceil() as i64 + 1;
    assert!(
        backlog <= most(SAMPLE_EVERY),
        "{backlog} backlog counts in {seconds:.1} s"
    );
    assert!(
        readiness <= most(READY_FRESH) + most(Duration::from_secs(5)),
        "{readiness} readiness queries in {seconds:.1} s"
    );
    shop.check_invariants().await;
}
