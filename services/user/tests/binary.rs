//! The `user-svc` binary as an operator runs it: configured by environment,
//! serving until SIGTERM, then exiting cleanly.

#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use shop_test_support::TestInfra;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn user_svc(infra: &TestInfra, url: &str, grpc: u16, http: u16) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_user-svc"));
    command
        .env("DATABASE_URL", url)
        .env("NATS_URL", infra.nats.url())
        .env("GRPC_ADDR", format!("127.0.0.1:{grpc}"))
        .env("HTTP_ADDR", format!("127.0.0.1:{http}"))
        .env("LOG_FORMAT", "json")
        .env("JWKS", infra.issuer.jwks())
        .env("JWT_ISSUER", shop_auth::LOCAL_ISSUER)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

#[tokio::test(flavor = "multi_thread")]
async fn serves_until_sigterm_and_refuses_a_taken_port_clearly() {
    let infra = TestInfra::start().await;
    let url = infra.postgres.create_database("shop_user").await;
    let (grpc, http) = (free_port(), free_port());
    let mut service = user_svc(&infra, &url, grpc, http).spawn().unwrap();

    let started = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", grpc))
        .await
        .is_err()
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "user-svc never listened"
        );
        assert!(
            service.try_wait().unwrap().is_none(),
            "user-svc exited early"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A second instance on the same ports says which port is taken.
    let second = user_svc(&infra, &url, grpc, free_port())
        .output()
        .await
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains(&format!("port {grpc}")), "{stderr}");

    let pid = service.id().unwrap().to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(20), service.wait())
        .await
        .expect("stops on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
    let mut stdout = String::new();
    tokio::io::AsyncReadExt::read_to_string(service.stdout.as_mut().unwrap(), &mut stdout)
        .await
        .unwrap();
    // JSON logs, one object per line.
    let first = stdout.lines().next().unwrap_or_default();
    assert!(
        first.starts_with('{') && first.contains("\"level\""),
        "{stdout}"
    );
    assert!(stdout.contains("stopped"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_stay_out_of_help_and_errors() {
    let infra = TestInfra::start().await;
    let secret_url = "postgres://shop:hunter2-db@127.0.0.1:1/shop_user";
    let mut help = user_svc(&infra, secret_url, free_port(), free_port());
    help.env("NATS_PASSWORD", "hunter2-nats").arg("--help");
    let help = help.output().await.unwrap();
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("DATABASE_URL"), "{text}");
    assert!(!text.contains("hunter2"), "--help shows a secret:\n{text}");

    // A database that cannot be reached: the error names it, not its password.
    let mut failing = user_svc(&infra, secret_url, free_port(), free_port());
    failing
        .env("NATS_USER", "user")
        .env("NATS_PASSWORD", "hunter2-nats");
    let failed = tokio::time::timeout(Duration::from_secs(30), failing.output())
        .await
        .expect("gives up on an unreachable database")
        .unwrap();
    assert!(!failed.status.success());
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&failed.stdout),
        String::from_utf8_lossy(&failed.stderr)
    );
    assert!(said.contains("database"), "{said}");
    assert!(!said.contains("hunter2"), "a secret in the output:\n{said}");
}
