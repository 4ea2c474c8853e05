//! The harness against the real servers it starts.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl as _};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness as _, embed_migrations};
use futures::StreamExt as _;
use shop_test_support::{TestInfra, TestNats, TestPostgres};

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("tests/migrations");

#[tokio::test]
async fn jetstream_publish_and_consume_round_trip() {
    let nats = TestNats::start().await;
    let js = jetstream::new(nats.client().await);
    js.create_stream(stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["orders.>".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();

    js.publish("orders.placed", "first".into())
        .await
        .unwrap()
        .await
        .unwrap();
    js.publish("orders.placed", "second".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let consumer = js
        .get_stream("ORDERS")
        .await
        .unwrap()
        .create_consumer(pull::Config {
            durable_name: Some("reader".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer
        .fetch()
        .max_messages(2)
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .unwrap();
    let mut bodies = Vec::new();
    while let Some(message) = messages.next().await {
        let message = message.unwrap();
        bodies.push(String::from_utf8(message.payload.to_vec()).unwrap());
        message.ack().await.unwrap();
    }
    assert_eq!(bodies, ["first", "second"]);
}

#[tokio::test]
async fn stream_survives_a_killed_and_restarted_server() {
    let mut nats = TestNats::start().await;
    let js = jetstream::new(nats.client().await);
    js.create_stream(stream::Config {
        name: "KEEP".into(),
        subjects: vec!["keep.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    js.publish("keep.one", "kept".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let port = nats.port();

    nats.kill();
    assert!(!nats.is_running());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "a killed server still accepts connections"
    );

    nats.start_again().await;
    assert_eq!(nats.port(), port);
    let js = jetstream::new(nats.client().await);
    let mut stream = js.get_stream("KEEP").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
    let kept = stream
        .get_last_raw_message_by_subject("keep.one")
        .await
        .unwrap();
    assert_eq!(kept.payload.as_ref(), b"kept");
}

#[tokio::test]
async fn migrations_run_on_a_fresh_database() {
    let postgres = TestPostgres::start().await;
    let url = postgres.create_database("fresh").await;

    let connection = AsyncPgConnection::establish(&url).await.unwrap();
    let mut wrapper = AsyncConnectionWrapper::<AsyncPgConnection>::from(connection);
    let applied = tokio::task::spawn_blocking(move || {
        wrapper
            .run_pending_migrations(MIGRATIONS)
            .map(|versions| versions.len())
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(applied, 1);

    let mut connection = AsyncPgConnection::establish(&url).await.unwrap();
    diesel::sql_query("INSERT INTO widgets (id, name) VALUES (1, 'sprocket')")
        .execute(&mut connection)
        .await
        .unwrap();
    let inserted = diesel::sql_query("SELECT id FROM widgets")
        .execute(&mut connection)
        .await
        .unwrap();
    assert_eq!(inserted, 1);
}

#[tokio::test]
async fn each_database_starts_empty_and_apart() {
    let postgres = TestPostgres::start().await;
    let first = postgres.create_database("first").await;
    let second = postgres.create_database("second").await;

    let mut connection = AsyncPgConnection::establish(&first).await.unwrap();
    diesel::sql_query("CREATE TABLE only_in_first (id INT)")
        .execute(&mut connection)
        .await
        .unwrap();

    let mut connection = AsyncPgConnection::establish(&second).await.unwrap();
    let error = diesel::sql_query("SELECT * FROM only_in_first")
        .execute(&mut connection)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("does not exist"), "{error}");
}

#[tokio::test]
async fn the_local_url_goes_through_the_unix_socket() {
    #[derive(diesel::QueryableByName)]
    struct Peer {
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
        address: Option<String>,
    }
    let postgres = TestPostgres::start().await;
    let dir = postgres
        .socket_dir()
        .expect("a temporary directory is short");
    let url = postgres.local_url("postgres", "postgres");
    assert!(url.contains("%2F"), "{url}");

    let mut connection = AsyncPgConnection::establish(&url).await.unwrap();
    // The server's address is NULL for a connection through a socket.
    let peer: Peer = diesel::sql_query("SELECT inet_server_addr()::text AS address")
        .get_result(&mut connection)
        .await
        .unwrap();
    assert_eq!(peer.address, None, "{url} went through TCP");
    let mut tcp = AsyncPgConnection::establish(&postgres.url("postgres"))
        .await
        .unwrap();
    let peer: Peer = diesel::sql_query("SELECT inet_server_addr()::text AS address")
        .get_result(&mut tcp)
        .await
        .unwrap();
    assert_eq!(peer.address.as_deref(), Some("127.0.0.1/32"));
    assert!(
        std::path::Path::new(dir)
            .join(format!(".s.PGSQL.{}", postgres.port()))
            .exists()
    );
}

#[tokio::test]
async fn postgres_comes_back_after_a_crash_with_its_data() {
    let mut postgres = TestPostgres::start().await;
    let url = postgres.create_database("durable").await;
    let mut connection = AsyncPgConnection::establish(&url).await.unwrap();
    diesel::sql_query("CREATE TABLE kept (id INT)")
        .execute(&mut connection)
        .await
        .unwrap();
    diesel::sql_query("INSERT INTO kept VALUES (7)")
        .execute(&mut connection)
        .await
        .unwrap();
    drop(connection);

    postgres.kill();
    assert!(
        AsyncPgConnection::establish(&url).await.is_err(),
        "a killed cluster still accepts connections"
    );
    postgres.start_again().await;

    let mut connection = AsyncPgConnection::establish(&url).await.unwrap();
    let rows = diesel::sql_query("SELECT id FROM kept WHERE id = 7")
        .execute(&mut connection)
        .await
        .unwrap();
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn dropping_the_handles_stops_the_servers() {
    let infra = TestInfra::start().await;
    let nats_port = infra.nats.port();
    let pg_port = infra.postgres.port();
    assert!(std::net::TcpStream::connect(("127.0.0.1", nats_port)).is_ok());
    assert!(std::net::TcpStream::connect(("127.0.0.1", pg_port)).is_ok());

    drop(infra);
    for port in [nats_port, pg_port] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} still open after drop"
        );
    }
}

#[tokio::test]
async fn a_panicking_test_still_stops_its_servers() {
    let (ports_tx, ports_rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let infra = TestInfra::start().await;
            ports_tx
                .send((infra.nats.port(), infra.postgres.port()))
                .unwrap();
            panic!("the test fails while its servers run");
        })
    })
    .join();
    assert!(result.is_err());
    let (nats_port, pg_port) = ports_rx.recv().unwrap();
    for port in [nats_port, pg_port] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} still open after a panic"
        );
    }
}

/// Longer than a restart's own retries (10 s), so that only waiting for
/// the port gets a server started again past it.
const HELD_BY_A_CLIENT: Duration = Duration::from_secs(12);

/// Makes `port` the local end of a client's connection, as the kernel may
/// give a stopped server's port to any client (one reconnecting to that
/// server, say): nothing can listen there until the connection, whose
/// server end has gone, is dropped after `time`.
///
/// A connection to the server that its side closed first leaves that side
/// on the port for 60 s (TIME_WAIT); a server may bind over it, a client
/// may not, so this waits for it to go first.
async fn held_by_a_client(
    port: u16,
    time: Duration,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let started = std::time::Instant::now();
    let socket = loop {
        let socket = tokio::net::TcpSocket::new_v4()?;
        match socket.bind(([127, 0, 0, 1], port).into()) {
            Ok(()) => break socket,
            Err(error)
                if error.kind() == std::io::ErrorKind::AddrInUse
                    && started.elapsed() < Duration::from_secs(70) =>
            {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(error) => return Err(error),
        }
    };
    let client = socket.connect(server.local_addr()?).await?;
    drop(server.accept().await?);
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", port)).is_err(),
        "port {port} can be listened on while a client holds it"
    );
    Ok(tokio::spawn(async move {
        tokio::time::sleep(time).await;
        drop(client);
    }))
}

/// The start's readiness probe closes its connection in a task of this
/// runtime; closed by the server's kill instead, the server's end would
/// linger on the port for a minute.
async fn let_the_readiness_probe_hang_up() {
    tokio::time::sleep(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn nats_started_again_waits_for_its_port_held_by_a_client() {
    let mut nats = TestNats::start().await;
    let port = nats.port();
    let_the_readiness_probe_hang_up().await;
    nats.kill();
    let held = held_by_a_client(port, HELD_BY_A_CLIENT).await.unwrap();

    nats.start_again().await;
    assert!(held.is_finished());
    let js = jetstream::new(nats.client().await);
    js.create_stream(stream::Config {
        name: "AGAIN".into(),
        subjects: vec!["again.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn postgres_started_again_waits_for_its_port_held_by_a_client() {
    let mut postgres = TestPostgres::start().await;
    let port = postgres.port();
    let_the_readiness_probe_hang_up().await;
    postgres.kill();
    let held = held_by_a_client(port, HELD_BY_A_CLIENT).await.unwrap();

    postgres.start_again().await;
    assert!(held.is_finished());
    AsyncPgConnection::establish(&postgres.url("postgres"))
        .await
        .unwrap();
}
