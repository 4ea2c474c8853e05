//! The services serving TLS with client certificates required (mutual
//! TLS): a whole saga through them, and the clients they refuse: plaintext,
//! TLS without a certificate, a certificate from another CA. The HTTP port
//! serves TLS too.

use shop_integration_tests::shop;
use std::sync::Arc;

use shop::{Settings, Shop, TestTls};
use shop_proto::order::v1::OrderStatus;
use shop_proto::user::v1::ListUsersRequest;
use shop_proto::user::v1::user_service_client::UserServiceClient;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[tokio::test(flavor = "multi_thread")]
async fn a_saga_runs_over_mutual_tls_and_other_clients_are_refused() {
    let tls = Arc::new(TestTls::generate());
    let mut shop = Shop::start(Settings {
        tls: Some(Arc::clone(&tls)),
        ..Settings::default()
    })
    .await;
    let user = shop.create_user("tls@example.com").await;
    shop.create_product("LAMP", 1999, 3).await;
    let order = shop.place(&user, &[("LAMP", 1)], "").await.unwrap();
    let order = shop.settled(&order.order_id).await;
    assert_eq!(order.status(), OrderStatus::Confirmed, "{:?}", order.steps);
    shop.check_invariants().await;

    let token = shop.infra.issuer.admin_token();
    let addr = shop.grpc_addr("user");
    let list = |channel: tonic::transport::Channel| {
        let token = token.clone();
        async move {
            UserServiceClient::new(shop_auth::with_token(channel, &token))
                .list_users(ListUsersRequest::default())
                .await
        }
    };
    // The same call over a plaintext connection: no answer.
    let plain = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    assert!(list(plain).await.is_err(), "a plaintext client was served");
    // TLS, but no client certificate.
    let anonymous = tls.channel(addr, None).await;
    assert!(anonymous.is_err() || list(anonymous.unwrap()).await.is_err());
    // A client certificate from a CA the service does not trust.
    let stranger = TestTls::generate();
    let foreign = tls.channel(addr, Some(&stranger)).await;
    assert!(foreign.is_err() || list(foreign.unwrap()).await.is_err());
    // And with the right one, it answers.
    let trusted = tls.channel(addr, Some(&tls)).await.unwrap();
    assert!(!list(trusted).await.unwrap().into_inner().users.is_empty());

    // shopctl reaches it the same way (demo, bench and probe share this).
    let client = shopctl::client_tls::ClientTls {
        tls_ca: Some(tls.path("ca.pem")),
        tls_cert: Some(tls.path("client.pem")),
        tls_key: Some(tls.path("client.key")),
        tls_domain: None,
    };
    let channel = client
        .endpoint(&format!("https://localhost:{}", addr.port()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    let without_ca = shopctl::client_tls::ClientTls::default()
        .endpoint(&format!("https://localhost:{}", addr.port()))
        .unwrap_err();
    assert!(
        format!("{without_ca:#}").contains("--tls-ca"),
        "{without_ca:#}"
    );

    // The HTTP port: TLS with the same certificate, no client certificate
    // asked for (probes, scrapes); plain HTTP gets no page.
    let http = shop.http_addr("user");
    let ready = tls.https_get(http, "/readyz").await.unwrap();
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let mut plain = tokio::net::TcpStream::connect(http).await.unwrap();
    plain
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        plain.read_to_end(&mut answer),
    )
    .await;
    assert!(
        !String::from_utf8_lossy(&answer).contains("200 OK"),
        "plain HTTP was served"
    );
}
