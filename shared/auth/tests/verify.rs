//! The verifier against real tokens: what it accepts, what it refuses and
//! why, and keys that rotate behind a file and behind a URL.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use shop_auth::{AuthConfig, AuthError, LOCAL_AUDIENCE, LOCAL_ISSUER, LocalIssuer, Verifier};

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(sub: &str) -> serde_json::Value {
    serde_json::json!({
        "iss": LOCAL_ISSUER, "aud": LOCAL_AUDIENCE, "sub": sub,
        "iat": now(), "nbf": now(), "exp": now() + 600,
    })
}

async fn verifier(issuer: &LocalIssuer) -> Verifier {
    Verifier::from_config(&issuer.auth_config()).await.unwrap()
}

#[tokio::test]
async fn a_good_token_names_its_caller_and_roles() {
    let issuer = LocalIssuer::generate();
    let verifier = verifier(&issuer).await;
    let caller = verifier.verify(&issuer.admin_token()).await.unwrap();
    assert!(caller.is_admin());
    let user = uuid::Uuid::now_v7().to_string();
    let caller = verifier.verify(&issuer.user_token(&user)).await.unwrap();
    assert_eq!(caller.subject(), user);
    assert!(!caller.is_admin());
    // `aud` may be a list that names us.
    let mut listed = claims("x");
    listed["aud"] = serde_json::json!(["other", LOCAL_AUDIENCE]);
    assert!(verifier.verify(&issuer.sign(&listed)).await.is_ok());
}

#[tokio::test]
async fn bad_tokens_are_refused_with_the_reason() {
    let issuer = LocalIssuer::generate();
    let verifier = verifier(&issuer).await;
    let stranger = LocalIssuer::generate();
    let with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut c = claims("u");
        edit(&mut c);
        issuer.sign(&c)
    };
    let cases: Vec<(&str, String, AuthError)> = vec![
        (
            "another key",
            stranger.user_token("u"),
            AuthError::UnknownKey,
        ),
        (
            "expired",
            with(&|c| c["exp"] = (now() - 120).into()),
            AuthError::Expired,
        ),
        (
            "not yet valid",
            with(&|c| c["nbf"] = (now() + 600).into()),
            AuthError::NotYetValid,
        ),
        (
            "wrong issuer",
            with(&|c| c["iss"] = "evil".into()),
            AuthError::Issuer,
        ),
        (
            "wrong audience",
            with(&|c| c["aud"] = "billing".into()),
            AuthError::Audience,
        ),
        (
            "no subject",
            with(&|c| {
                c.as_object_mut().unwrap().remove("sub");
            }),
            AuthError::Claim("sub".into()),
        ),
        (
            "no expiry",
            with(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
            AuthError::Claim("exp".into()),
        ),
    ];
    for (what, token, expected) in cases {
        assert_eq!(
            verifier.verify(&token).await.unwrap_err(),
            expected,
            "{what}"
        );
    }
    // A signature made by another key under our key id.
    let good = issuer.user_token("u");
    let forged = stranger.user_token("u");
    let (head, _) = good.rsplit_once('.').unwrap();
    let (_, signature) = forged.rsplit_once('.').unwrap();
    assert_eq!(
        verifier
            .verify(&format!("{head}.{signature}"))
            .await
            .unwrap_err(),
        AuthError::BadSignature
    );
    // Within the clock skew an expired token still passes; past it, not.
    let just = with(&|c| c["exp"] = (now() - 5).into());
    assert!(verifier.verify(&just).await.is_ok());
}

#[tokio::test]
async fn alg_none_and_hmac_with_the_public_key_are_refused() {
    use base64::Engine as _;
    let issuer = LocalIssuer::generate();
    let verifier = verifier(&issuer).await;
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let unsigned = format!(
        "{}.{}.",
        b64(&serde_json::json!({"alg": "none", "typ": "JWT"})),
        b64(&claims("admin"))
    );
    assert!(matches!(
        verifier.verify(&unsigned).await,
        Err(AuthError::Algorithm(_))
    ));
    // The classic confusion: an HMAC keyed with the published public key.
    let jwks: serde_json::Value = serde_json::from_str(&issuer.jwks()).unwrap();
    let public = jwks["keys"][0]["x"].as_str().unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = jwks["keys"][0]["kid"].as_str().map(str::to_owned);
    let mut admin = claims("admin");
    admin["roles"] = serde_json::json!(["admin"]);
    let hmac = jsonwebtoken::encode(
        &header,
        &admin,
        &jsonwebtoken::EncodingKey::from_secret(public.as_bytes()),
    )
    .unwrap();
    let refused = verifier.verify(&hmac).await.unwrap_err();
    assert!(matches!(refused, AuthError::Algorithm(_)), "{refused:?}");
    assert!(refused.to_string().contains("HS256"), "{refused}");
    for junk in ["", "abc", "a.b.c", "a.b.c.d"] {
        assert!(
            matches!(verifier.verify(junk).await, Err(AuthError::Malformed(_))),
            "{junk:?}"
        );
    }
}

#[tokio::test]
async fn roles_may_sit_in_a_nested_claim() {
    let issuer = LocalIssuer::generate();
    let config = AuthConfig {
        jwt_roles_claim: "realm_access.roles".into(),
        ..issuer.auth_config()
    };
    let verifier = Verifier::from_config(&config).await.unwrap();
    let mut keycloak = claims("ops");
    keycloak["realm_access"] = serde_json::json!({"roles": ["offline_access", "admin"]});
    assert!(
        verifier
            .verify(&issuer.sign(&keycloak))
            .await
            .unwrap()
            .is_admin()
    );
    // The flat claim means nothing under this configuration.
    assert!(
        !verifier
            .verify(&issuer.admin_token())
            .await
            .unwrap()
            .is_admin()
    );
}

#[tokio::test]
async fn a_rotated_key_file_is_read_again_when_a_token_names_a_new_key() {
    let dir = tempfile::tempdir().unwrap();
    let old = LocalIssuer::load_or_create(dir.path()).unwrap();
    let config = AuthConfig {
        jwks: None,
        jwks_file: Some(LocalIssuer::jwks_path(dir.path())),
        ..old.auth_config()
    };
    let verifier = Verifier::from_config(&config).await.unwrap();
    assert!(verifier.verify(&old.admin_token()).await.is_ok());
    // The key is replaced: the first token under the new one reads the
    // file again.
    let new = LocalIssuer::generate();
    std::fs::write(LocalIssuer::jwks_path(dir.path()), new.jwks()).unwrap();
    assert!(verifier.verify(&new.admin_token()).await.is_ok());
    assert_eq!(
        verifier.verify(&old.admin_token()).await.unwrap_err(),
        AuthError::UnknownKey,
        "the old key is no longer trusted"
    );
}

#[tokio::test]
async fn keys_from_a_url_are_fetched_and_refetched_for_a_new_key() {
    let old = LocalIssuer::generate();
    let new = LocalIssuer::generate();
    let served = Arc::new(Mutex::new(old.jwks()));
    let fetches = Arc::new(Mutex::new(0));
    let app = {
        let (served, fetches) = (Arc::clone(&served), Arc::clone(&fetches));
        axum::Router::new().route(
            "/certs",
            axum::routing::get(move || {
                let body = served.lock().unwrap().clone();
                *fetches.lock().unwrap() += 1;
                async move { body }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/certs", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let config = AuthConfig {
        jwks: None,
        jwks_url: Some(url.clone()),
        ..old.auth_config()
    };
    let verifier = Verifier::from_config(&config).await.unwrap();
    assert!(verifier.verify(&old.user_token("u")).await.is_ok());
    assert!(verifier.verify(&old.user_token("u")).await.is_ok());
    assert_eq!(*fetches.lock().unwrap(), 1, "keys are cached");

    // The provider rotates: the first token under the new key fetches again.
    *served.lock().unwrap() = format!(
        "{{\"keys\":[{},{}]}}",
        key_of(&old.jwks()),
        key_of(&new.jwks())
    );
    assert!(verifier.verify(&new.user_token("u")).await.is_ok());
    assert_eq!(*fetches.lock().unwrap(), 2);
    // Made-up key ids do not make it fetch on every call.
    for _ in 0..5 {
        let _ = verifier
            .verify(&LocalIssuer::generate().user_token("u"))
            .await;
    }
    assert_eq!(
        *fetches.lock().unwrap(),
        2,
        "a fetch just happened: misses wait for the pause between fetches"
    );

    // Nothing answers at start-up: the service cannot start.
    let missing = AuthConfig {
        jwks_url: Some(format!("{url}/nothing-here")),
        ..config
    };
    assert!(matches!(
        Verifier::from_config(&missing).await,
        Err(AuthError::KeysUnavailable(_))
    ));
}

fn key_of(jwks: &str) -> String {
    let set: serde_json::Value = serde_json::from_str(jwks).unwrap();
    set["keys"][0].to_string()
}
