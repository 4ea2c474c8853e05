//! Where the trusted keys come from: only over TLS (a private CA given with
//! `--jwks-ca`), and at most one fetch per window however many tokens name
//! keys nobody has.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use shop_auth::{AuthConfig, AuthError, LocalIssuer, Verifier};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A JWKS endpoint on loopback that counts the requests it answers, over
/// TLS when given a server configuration.
struct JwksServer {
    port: u16,
    served: Arc<Mutex<String>>,
    requests: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(jwks: String, tls: Option<rustls::ServerConfig>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = Arc::new(Mutex::new(jwks));
        let requests = Arc::new(AtomicUsize::new(0));
        let acceptor = tls.map(|config| tokio_rustls::TlsAcceptor::from(Arc::new(config)));
        let (body, count) = (Arc::clone(&served), Arc::clone(&requests));
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (acceptor, body, count) =
                    (acceptor.clone(), Arc::clone(&body), Arc::clone(&count));
                tokio::spawn(async move {
                    match acceptor {
                        Some(acceptor) => {
                            // A client that does not trust us ends here.
                            if let Ok(tls) = acceptor.accept(tcp).await {
                                answer(tls, &body, &count).await;
                            }
                        }
                        None => answer(tcp, &body, &count).await,
                    }
                });
            }
        });
        Self {
            port,
            served,
            requests,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Reads one request's head and answers the key set, then closes.
async fn answer<S>(mut stream: S, body: &Mutex<String>, count: &AtomicUsize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut head = Vec::new();
    let mut buf = [0_u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    count.fetch_add(1, Ordering::SeqCst);
    let body = body.lock().unwrap().clone();
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// A CA and a certificate it signed for 127.0.0.1, in a temporary directory.
struct PrivateCa {
    dir: tempfile::TempDir,
    server: rustls::ServerConfig,
}

impl PrivateCa {
    fn generate() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(cert.pem().as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap();
        Self { dir, server }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
}

fn from_url(issuer: &LocalIssuer, url: String, ca: Option<PathBuf>) -> AuthConfig {
    AuthConfig {
        jwks: None,
        jwks_url: Some(url),
        jwks_ca: ca,
        ..issuer.auth_config()
    }
}

#[tokio::test]
async fn keys_over_plain_http_from_another_host_are_refused() {
    let issuer = LocalIssuer::generate();
    let error = Verifier::from_config(&from_url(&issuer, "http://idp.example/certs".into(), None))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, AuthError::Refused(why) if why.contains("https://")),
        "{error}"
    );
    // Said out loud, the operator may; the refusal is gone (what is left is
    // that no such host answers).
    let allowed = AuthConfig {
        allow_insecure_jwks_http: true,
        ..from_url(&issuer, "http://idp.example/certs".into(), None)
    };
    assert!(matches!(
        Verifier::from_config(&allowed).await,
        Err(AuthError::KeysUnavailable(_))
    ));
    // --jwks-ca with a plain URL is a mistake, said so.
    let ca = PrivateCa::generate();
    assert!(matches!(
        Verifier::from_config(&from_url(
            &issuer,
            "http://127.0.0.1:9/certs".into(),
            Some(ca.ca())
        ))
        .await,
        Err(AuthError::Refused(_))
    ));
}

#[tokio::test]
async fn keys_behind_a_private_ca_are_fetched_with_jwks_ca_and_only_then() {
    let issuer = LocalIssuer::generate();
    let ca = PrivateCa::generate();
    let server = JwksServer::start(issuer.jwks(), Some(ca.server.clone())).await;
    let url = format!("https://127.0.0.1:{}/certs", server.port);

    let verifier = Verifier::from_config(&from_url(&issuer, url.clone(), Some(ca.ca())))
        .await
        .unwrap();
    assert!(verifier.verify(&issuer.admin_token()).await.is_ok());
    assert_eq!(server.requests(), 1);

    // The machine's roots do not know the private CA; another CA is no
    // better: the keys are never read.
    for other in [None, Some(PrivateCa::generate().ca())] {
        let error = Verifier::from_config(&from_url(&issuer, url.clone(), other))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, AuthError::KeysUnavailable(why) if why.contains("TLS")),
            "{error}"
        );
    }
    assert_eq!(
        server.requests(),
        1,
        "no request went past a failed handshake"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_unknown_key_ids_makes_one_fetch_and_a_rotated_key_gets_in() {
    let old = LocalIssuer::generate();
    let server = JwksServer::start(old.jwks(), None).await;
    let url = format!("http://127.0.0.1:{}/certs", server.port);
    let verifier = Verifier::from_config(&from_url(&old, url, None))
        .await
        .unwrap();
    assert_eq!(server.requests(), 1);

    // The provider rotates to a new key; at the same moment 200 tokens name
    // keys nobody has, and one token is signed with the new key.
    let new = LocalIssuer::generate();
    *server.served.lock().unwrap() = new.jwks();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let (verifier, token) = (verifier.clone(), LocalIssuer::generate().user_token("u"));
        calls.spawn(async move { (false, verifier.verify(&token).await) });
    }
    let (rotated, token) = (verifier.clone(), new.admin_token());
    calls.spawn(async move { (true, rotated.verify(&token).await) });
    while let Some(call) = calls.join_next().await {
        match call.unwrap() {
            (true, result) => assert!(result.is_ok(), "the rotated key: {result:?}"),
            (false, result) => assert_eq!(result.unwrap_err(), AuthError::UnknownKey),
        }
    }
    assert_eq!(server.requests(), 2, "one fetch for the whole burst");
}
