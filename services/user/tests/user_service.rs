//! The user service alone, on free ports against a fresh database and a real
//! NATS server.

#![allow(clippy::unwrap_used)]

use prost::Message as _;
use shop_proto::user::v1::user_service_client::UserServiceClient;
use shop_proto::user::v1::{CreateUserRequest, GetUserRequest, ListUsersRequest, UserCreated};
use shop_service::{Listeners, Running, ServiceConfig};
use shop_test_support::TestInfra;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

async fn spawn() -> (TestInfra, Running) {
    let infra = TestInfra::start().await;
    let url = infra.postgres.create_database("shop_user").await;
    let config = shop_user::Config {
        service: ServiceConfig::local(url, infra.nats.url(), infra.issuer.auth_config()),
    };
    let running = Running::spawn(shop_user::build(config).await.unwrap());
    (infra, running)
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

async fn grpcurl(args: &[&str]) -> String {
    let output = tokio::process::Command::new("grpcurl")
        .args(args)
        .output()
        .await
        .expect("grpcurl (scripts/bootstrap installs it)");
    assert!(
        output.status.success(),
        "grpcurl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_created_user_is_stored_and_published_as_user_created() {
    let (infra, running) = spawn().await;
    let mut users = UserServiceClient::new(shop_auth::with_token(
        running.channel().await.unwrap(),
        &infra.issuer.admin_token(),
    ));
    let user = users
        .create_user(CreateUserRequest {
            email: "Ann@Example.com".into(),
            name: " Ann ".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(user.email, "Ann@Example.com");
    assert_eq!(user.name, "Ann");
    let fetched = users
        .get_user(GetUserRequest {
            user_id: user.user_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(fetched, user);

    let js = async_nats::jetstream::new(infra.nats.client().await);
    let stream = js.get_stream("USER").await.unwrap();
    let message = loop {
        match stream.get_last_raw_message_by_subject("user.created").await {
            Ok(message) => break message,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    };
    let header = |name: &str| {
        message
            .headers
            .get(name)
            .map(|value| value.as_str().to_owned())
            .unwrap_or_default()
    };
    assert_eq!(header("ce-type"), "shop.user.v1.UserCreated");
    assert_eq!(header("ce-source"), "shop/user");
    assert_eq!(header("ce-specversion"), "1.0");
    assert_eq!(header("ce-correlationid"), user.user_id);
    assert_eq!(header("Nats-Msg-Id"), header("ce-id"));
    let event = UserCreated::decode(message.payload.as_ref()).unwrap();
    assert_eq!(
        (event.user_id.as_str(), event.email.as_str()),
        (user.user_id.as_str(), "Ann@Example.com")
    );
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn users_are_listed_page_by_page_in_registration_order() {
    let (infra, running) = spawn().await;
    let mut users = UserServiceClient::new(shop_auth::with_token(
        running.channel().await.unwrap(),
        &infra.issuer.admin_token(),
    ));
    let mut created = Vec::new();
    for i in 0..5 {
        let request = CreateUserRequest {
            email: format!("user{i}@example.com"),
            name: format!("User {i}"),
        };
        created.push(
            users
                .create_user(request)
                .await
                .unwrap()
                .into_inner()
                .user
                .unwrap()
                .user_id,
        );
    }
    let mut listed = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = users
            .list_users(ListUsersRequest {
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        listed.extend(page.users.into_iter().map(|user| user.user_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(listed, created);
    assert_eq!(pages, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_health_and_http_probes_answer() {
    let (infra, running) = spawn().await;
    let addr = running.grpc_addr().to_string();
    // Listing and health checks need no token. grpcurl 1.8 asks over
    // reflection v1alpha; only what this server serves is listed.
    let services = grpcurl(&["-plaintext", &addr, "list"]).await;
    assert!(!services.contains("OrderService"), "{services}");
    for service in ["shop.user.v1.UserService", "grpc.health.v1.Health"] {
        assert!(
            services.lines().any(|line| line == service),
            "{service} missing from:\n{services}"
        );
    }
    let health = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"service":"shop.user.v1.UserService"}"#,
        &addr,
        "grpc.health.v1.Health/Check",
    ])
    .await;
    assert!(health.contains("\"SERVING\""), "{health}");
    let authorization = format!("authorization: Bearer {}", infra.issuer.admin_token());
    let created = grpcurl(&[
        "-plaintext",
        "-H",
        &authorization,
        "-d",
        r#"{"email":"grpcurl@example.com","name":"From grpcurl"}"#,
        &addr,
        "shop.user.v1.UserService/CreateUser",
    ])
    .await;
    assert!(created.contains("grpcurl@example.com"), "{created}");

    let healthz = http_get(running.http_addr(), "/healthz").await;
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
    let readyz = http_get(running.http_addr(), "/readyz").await;
    assert!(readyz.starts_with("HTTP/1.1 200"), "{readyz}");
}

/// Listeners bound by whoever starts the service (`shopctl up` binds its
/// whole stack's ports first) are the ones it serves on; the addresses in
/// its configuration are not bound at all.
#[tokio::test(flavor = "multi_thread")]
async fn listeners_handed_over_are_served_on_instead_of_the_addresses() {
    let infra = TestInfra::start().await;
    let url = infra.postgres.create_database("shop_user").await;
    let bind = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (grpc, http, taken) = (bind(), bind(), bind());
    let (grpc_port, http_port) = (
        grpc.local_addr().unwrap().port(),
        http.local_addr().unwrap().port(),
    );
    let config = ServiceConfig {
        // Something listens there: binding these would fail.
        grpc_addr: Some(taken.local_addr().unwrap()),
        http_addr: Some(taken.local_addr().unwrap()),
        listeners: Listeners::new(grpc, http),
        ..ServiceConfig::local(url, infra.nats.url(), infra.issuer.auth_config())
    };
    let running = Running::spawn(
        shop_user::build(shop_user::Config { service: config })
            .await
            .unwrap(),
    );
    assert_eq!(running.grpc_addr().port(), grpc_port);
    assert_eq!(running.http_addr().port(), http_port);
    wait_health(&running, true).await;
}

/// Registers a user as the administrator.
async fn register(
    running: &Running,
    infra: &TestInfra,
    email: &str,
) -> Result<tonic::Response<shop_proto::user::v1::CreateUserResponse>, tonic::Status> {
    UserServiceClient::new(shop_auth::with_token(
        running.channel().await.unwrap(),
        &infra.issuer.admin_token(),
    ))
    .create_user(CreateUserRequest {
        email: email.into(),
        name: "Registered".into(),
    })
    .await
}

/// Polls `check` until it holds, for at most 15 s.
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(15),
            "never: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The overall `grpc.health.v1` status and `/readyz`'s status line, polled
/// until they read `serving` (or the opposite), within 15 s.
async fn wait_health(running: &Running, serving: bool) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut health = HealthClient::new(running.channel().await.unwrap());
    let expected = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    let started = std::time::Instant::now();
    loop {
        let mut all = true;
        for service in ["", "shop.user.v1.UserService"] {
            let status = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status();
            all &= status == expected;
        }
        let readyz = http_get(running.http_addr(), "/readyz").await;
        let ready_line = if serving {
            "HTTP/1.1 200"
        } else {
            "HTTP/1.1 503"
        };
        if all && readyz.starts_with(ready_line) {
            return;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(15),
            "health never became {expected:?}; /readyz: {readyz}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_follows_nats_and_postgres_down_and_back() {
    let (mut infra, running) = spawn().await;
    wait_health(&running, true).await;

    infra.nats.stop();
    // Still ready: its RPCs need only PostgreSQL (events wait in the
    // outbox), so a NATS outage must not take it out of its Service. The
    // outage shows in /readyz's text and in a gauge.
    let http = running.http_addr();
    until("NATS shows as disconnected", move || async move {
        let readyz = http_get(http, "/readyz").await;
        let metrics = http_get(http, "/metrics").await;
        readyz.starts_with("HTTP/1.1 200")
            && readyz.contains("NATS disconnected")
            && metrics.contains("shop_nats_connected 0")
    })
    .await;
    wait_health(&running, true).await;
    register(&running, &infra, "no-nats@example.com")
        .await
        .expect("registering needs PostgreSQL only");
    // Alive all the same: a liveness probe must not restart it.
    let liveness =
        tonic_health::pb::health_client::HealthClient::new(running.channel().await.unwrap())
            .check(tonic_health::pb::HealthCheckRequest {
                service: shop_service::LIVENESS.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
    assert_eq!(
        liveness,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    let healthz = http_get(running.http_addr(), "/healthz").await;
    assert!(healthz.starts_with("HTTP/1.1 200"), "alive all along");
    infra.nats.start_again().await;
    until("NATS shows as connected again", move || async move {
        let metrics = http_get(http, "/metrics").await;
        metrics.contains("shop_nats_connected 1")
    })
    .await;

    infra.postgres.stop();
    wait_health(&running, false).await;
    infra.postgres.start_again().await;
    wait_health(&running, true).await;

    // And it serves again, with no restart.
    register(&running, &infra, "back@example.com")
        .await
        .unwrap();
    let metrics = http_get(running.http_addr(), "/metrics").await;
    assert!(
        metrics.contains(
            r#"shop_grpc_requests_total{method="shop.user.v1.UserService/CreateUser",code="Ok"} 2"#
        ),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn made_up_paths_count_under_one_label() {
    let (infra, running) = spawn().await;
    let channel = running.channel().await.unwrap();
    for (i, token) in [None, Some(infra.issuer.admin_token())]
        .into_iter()
        .cycle()
        .take(40)
        .enumerate()
    {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let mut request = tonic::Request::new(());
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let path = format!("/x.Made{i}/Up{i}").parse().unwrap();
        let answer = grpc
            .unary::<(), (), _>(request, path, tonic_prost::ProstCodec::default())
            .await;
        assert!(answer.is_err(), "{i}: a made-up path answered");
    }
    let metrics = http_get(running.http_addr(), "/metrics").await;
    assert!(!metrics.contains("x.Made"), "{metrics}");
    let unknown: u64 = metrics
        .lines()
        .filter(|line| line.starts_with("shop_grpc_requests_total{method=\"unknown\""))
        .map(|line| line.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(unknown, 40, "{metrics}");
}
