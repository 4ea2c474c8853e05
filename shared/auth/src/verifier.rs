//! Verifying bearer tokens against the trusted keys.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::{AuthConfig, AuthError, Caller};

/// The algorithms a token may be signed with: asymmetric ones only, so that
/// the services hold nothing that could sign. `none` and HMAC are refused.
const ACCEPTED: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// How soon after a reload a token naming an unknown key may cause another:
/// a stream of tokens with made-up key ids must not hammer the provider.
const RELOAD_AT_MOST_EVERY: Duration = Duration::from_secs(10);

/// A token longer than this is refused before any parsing.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Checks bearer tokens; cheap to clone (one key cache shared by clones).
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("issuer", &self.inner.issuer)
            .field("audience", &self.inner.audience)
            .finish_non_exhaustive()
    }
}

struct Inner {
    source: Source,
    issuer: String,
    audience: String,
    roles_claim: Vec<String>,
    leeway: u64,
    refresh: Duration,
    keys: RwLock<Keys>,
    /// Serialises reloads; holds when the last one was tried (the load at
    /// start-up does not count).
    reload: tokio::sync::Mutex<Option<Instant>>,
    refreshing: AtomicBool,
}

enum Source {
    Inline,
    File(PathBuf),
    Url(crate::fetch::JwksUrl),
}

struct Keys {
    trusted: Arc<Vec<TrustedKey>>,
    loaded_at: Instant,
}

struct TrustedKey {
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

impl Verifier {
    /// Loads the keys `config` names; fails when they cannot be read or
    /// none of them can verify a signature.
    pub async fn from_config(config: &AuthConfig) -> Result<Self, AuthError> {
        let (source, trusted) = match (&config.jwks, &config.jwks_file, &config.jwks_url) {
            (Some(jwks), _, _) => (Source::Inline, parse_jwks(jwks.as_bytes())?),
            (None, Some(path), _) => {
                let source = Source::File(path.clone());
                let keys = load(&source).await?;
                (source, keys)
            }
            (None, None, Some(url)) => {
                let url = crate::fetch::JwksUrl::new(
                    url,
                    config.jwks_ca.as_deref(),
                    config.allow_insecure_jwks_http,
                )?;
                let source = Source::Url(url);
                let keys = load(&source).await?;
                (source, keys)
            }
            (None, None, None) => {
                return Err(AuthError::KeysUnavailable(
                    "no keys configured: give --jwks-file, --jwks-url or --jwks".into(),
                ));
            }
        };
        if config.jwt_issuer.is_empty() {
            return Err(AuthError::KeysUnavailable(
                "no issuer configured: give --jwt-issuer".into(),
            ));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                source,
                issuer: config.jwt_issuer.clone(),
                audience: config.jwt_audience.clone(),
                roles_claim: config
                    .jwt_roles_claim
                    .split('.')
                    .map(str::to_owned)
                    .collect(),
                leeway: config.jwt_leeway_s,
                refresh: Duration::from_secs(config.jwks_refresh_s.max(1)),
                keys: RwLock::new(Keys {
                    trusted: Arc::new(trusted),
                    loaded_at: Instant::now(),
                }),
                reload: tokio::sync::Mutex::new(None),
                refreshing: AtomicBool::new(false),
            }),
        })
    }

    /// Verifies `token` (the part after `Bearer `) and returns its caller.
    pub async fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed("the token is too long".into()));
        }
        let algorithm = accepted_algorithm(token)?;
        let header = jsonwebtoken::decode_header(token)?;
        let kid = header.kid.as_deref();
        self.refresh_if_stale();
        let key = match self.find(kid, algorithm) {
            Some(key) => key,
            None => {
                self.reload_after_miss().await;
                self.find(kid, algorithm).ok_or(AuthError::UnknownKey)?
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.inner.leeway;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.inner.issuer]);
        validation.set_audience(&[&self.inner.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key,
            &validation,
        )?;
        let subject = match data.claims.get("sub") {
            Some(serde_json::Value::String(sub)) if !sub.is_empty() => sub.clone(),
            _ => return Err(AuthError::Claim("sub".into())),
        };
        let roles = self.roles(&data.claims);
        Ok(Caller::new(subject, roles))
    }

    fn roles(&self, claims: &serde_json::Map<String, serde_json::Value>) -> Vec<String> {
        let mut path = self.inner.roles_claim.iter();
        let Some(first) = path.next() else {
            return Vec::new();
        };
        let mut value = claims.get(first);
        for part in path {
            value = value.and_then(|v| v.get(part));
        }
        match value {
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect(),
            Some(serde_json::Value::String(list)) => {
                list.split_whitespace().map(str::to_owned).collect()
            }
            _ => Vec::new(),
        }
    }

    /// The trusted key for `kid` (or, for a token without one, the only key
    /// that fits the algorithm) that may verify `algorithm`.
    fn find(&self, kid: Option<&str>, algorithm: Algorithm) -> Option<DecodingKey> {
        let keys = self
            .inner
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut fitting = keys
            .trusted
            .iter()
            .filter(|key| key.algorithms.contains(&algorithm))
            .filter(|key| kid.is_none() || key.kid.as_deref() == kid);
        let first = fitting.next()?;
        // Without a key id, more than one candidate is ambiguous: refuse
        // rather than try each.
        if kid.is_none() && fitting.next().is_some() {
            return None;
        }
        Some(first.key.clone())
    }

    /// Past the refresh period, reloads the keys in the background; the
    /// token at hand is checked against the keys as they are.
    fn refresh_if_stale(&self) {
        if matches!(self.inner.source, Source::Inline) {
            return;
        }
        let stale = self
            .inner
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .loaded_at
            .elapsed()
            > self.inner.refresh;
        if stale && !self.inner.refreshing.swap(true, Ordering::AcqRel) {
            let this = self.clone();
            tokio::spawn(async move {
                this.reload().await;
                this.inner.refreshing.store(false, Ordering::Release);
            });
        }
    }

    /// A token named a key we lack: the provider may have rotated its keys.
    /// At most one fetch per `RELOAD_AT_MOST_EVERY`: the window is checked
    /// and recorded under one lock, held through the fetch, so a burst of
    /// misses makes one fetch and every token of the burst is then checked
    /// against its result.
    async fn reload_after_miss(&self) {
        if matches!(self.inner.source, Source::Inline) {
            return;
        }
        let mut last = self.inner.reload.lock().await;
        if last.is_some_and(|at| at.elapsed() < RELOAD_AT_MOST_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        self.load_and_swap().await;
    }

    /// The periodic refresh: one fetch, recorded as a reload.
    async fn reload(&self) {
        let mut last = self.inner.reload.lock().await;
        *last = Some(Instant::now());
        self.load_and_swap().await;
    }

    async fn load_and_swap(&self) {
        match load(&self.inner.source).await {
            Ok(trusted) => {
                let mut keys = self
                    .inner
                    .keys
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                *keys = Keys {
                    trusted: Arc::new(trusted),
                    loaded_at: Instant::now(),
                };
            }
            // Keep the keys we have: a provider that is down for a moment
            // must not lock everyone out.
            Err(error) => tracing::warn!(%error, "cannot reload the trusted keys"),
        }
    }
}

/// The token's `alg`, if it is one we accept; read before anything else so
/// that `none` and HMAC are refused with a message that says so.
fn accepted_algorithm(token: &str) -> Result<Algorithm, AuthError> {
    let not_jwt = || AuthError::Malformed("the token is not a JWT (three base64url parts)".into());
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(not_jwt());
    };
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| not_jwt())?;
    let header: serde_json::Value = serde_json::from_slice(&header).map_err(|_| not_jwt())?;
    let alg = header
        .get("alg")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| AuthError::Malformed("the token's header has no `alg`".into()))?;
    let shown: String = alg.chars().take(16).collect();
    let algorithm: Algorithm = alg
        .parse()
        .map_err(|_| AuthError::Algorithm(format!("{shown:?}")))?;
    if ACCEPTED.contains(&algorithm) {
        Ok(algorithm)
    } else {
        Err(AuthError::Algorithm(format!("{shown:?}")))
    }
}

async fn load(source: &Source) -> Result<Vec<TrustedKey>, AuthError> {
    let bytes = match source {
        Source::Inline => return Ok(Vec::new()),
        Source::File(path) => tokio::fs::read(path).await.map_err(|error| {
            AuthError::KeysUnavailable(format!("reading {}: {error}", path.display()))
        })?,
        Source::Url(url) => url.get().await.map_err(|error| {
            AuthError::KeysUnavailable(format!("fetching {}: {error}", url.as_str()))
        })?,
    };
    parse_jwks(&bytes)
}

/// The signature keys of a JWKS. Keys for encryption, symmetric keys and
/// keys of kinds we cannot use are skipped (a provider may publish them);
/// a set with no usable key is an error.
fn parse_jwks(bytes: &[u8]) -> Result<Vec<TrustedKey>, AuthError> {
    #[derive(serde::Deserialize)]
    struct Set {
        keys: Vec<serde_json::Value>,
    }
    let set: Set = serde_json::from_slice(bytes)
        .map_err(|error| AuthError::KeysUnavailable(format!("not a JSON Web Key Set: {error}")))?;
    let trusted: Vec<TrustedKey> = set
        .keys
        .into_iter()
        .filter_map(|key| serde_json::from_value::<Jwk>(key).ok())
        .filter_map(|jwk| trusted_key(&jwk))
        .collect();
    if trusted.is_empty() {
        return Err(AuthError::KeysUnavailable(
            "the key set has no asymmetric signature key".into(),
        ));
    }
    Ok(trusted)
}

fn trusted_key(jwk: &Jwk) -> Option<TrustedKey> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let by_kind = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => vec![Algorithm::EdDSA],
            _ => return None,
        },
        // A shared secret: whoever can verify with it can sign with it.
        AlgorithmParameters::OctetKey(_) => return None,
    };
    let algorithms = match jwk.common.key_algorithm {
        None => by_kind,
        Some(declared) => {
            let declared = signature_algorithm(declared)?;
            if !by_kind.contains(&declared) {
                return None;
            }
            vec![declared]
        }
    };
    Some(TrustedKey {
        kid: jwk.common.key_id.clone(),
        algorithms,
        key: DecodingKey::from_jwk(jwk).ok()?,
    })
}

fn signature_algorithm(declared: KeyAlgorithm) -> Option<Algorithm> {
    Some(match declared {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(part: &serde_json::Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(part.to_string())
    }

    #[test]
    fn none_and_hmac_are_refused_by_name() {
        for alg in ["none", "HS256", "HS512", "RSA-OAEP"] {
            let token = format!(
                "{}.{}.",
                encode(&serde_json::json!({"alg": alg, "typ": "JWT"})),
                encode(&serde_json::json!({"sub": "x"}))
            );
            match accepted_algorithm(&token) {
                Err(AuthError::Algorithm(shown)) => assert!(shown.contains(alg), "{shown}"),
                other => panic!("{alg}: {other:?}"),
            }
        }
        assert!(matches!(
            accepted_algorithm("not-a-jwt"),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn symmetric_and_encryption_keys_are_never_trusted() {
        let jwks = serde_json::json!({"keys": [
            {"kty": "oct", "k": "c2VjcmV0", "alg": "HS256", "kid": "hmac"},
        ]});
        assert!(parse_jwks(jwks.to_string().as_bytes()).is_err());
        let issuer = crate::LocalIssuer::generate();
        let mut set: serde_json::Value = serde_json::from_str(&issuer.jwks()).unwrap();
        set["keys"][0]["use"] = "enc".into();
        assert!(parse_jwks(set.to_string().as_bytes()).is_err());
        set["keys"][0]["use"] = "sig".into();
        set["keys"][0]["alg"] = "ES256".into();
        assert!(
            parse_jwks(set.to_string().as_bytes()).is_err(),
            "an Ed25519 key declared as ES256 is not a key we can use"
        );
    }
}
