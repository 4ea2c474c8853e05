//! A local identity provider: one Ed25519 key, for a laptop and for tests.
//! In production an external OIDC provider signs the tokens; this is what
//! `shopctl up` trusts and `shopctl token` signs with.

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::signature::KeyPair as _;

use crate::AuthConfig;

/// The `iss` of tokens the local issuer signs.
pub const LOCAL_ISSUER: &str = "shopctl";
/// The `aud` of tokens the local issuer signs, and the services' default.
pub const LOCAL_AUDIENCE: &str = "shop";

const KEY_FILE: &str = "signing-key.pem";
const JWKS_FILE: &str = "jwks.json";

/// An Ed25519 signing key and the tokens it signs.
pub struct LocalIssuer {
    pkcs8: Vec<u8>,
    public: Vec<u8>,
    kid: String,
}

impl std::fmt::Debug for LocalIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalIssuer")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl LocalIssuer {
    /// A new key, held in memory only.
    pub fn generate() -> Self {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .expect("the system's random number generator works");
        Self::from_pkcs8(pkcs8.as_ref().to_vec()).expect("ring reads the key it made")
    }

    fn from_pkcs8(pkcs8: Vec<u8>) -> Result<Self, String> {
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8)
            .map_err(|error| format!("not an Ed25519 PKCS#8 key: {error}"))?;
        let public = pair.public_key().as_ref().to_vec();
        let digest = ring::digest::digest(&ring::digest::SHA256, &public);
        let kid = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest.as_ref()[..12]);
        Ok(Self { pkcs8, public, kid })
    }

    /// The key kept in `dir` (`signing-key.pem`, readable by its owner
    /// only, and the public `jwks.json`), made there first if absent.
    pub fn load_or_create(dir: &Path) -> std::io::Result<Self> {
        if dir.join(KEY_FILE).exists() {
            return Self::load(dir);
        }
        std::fs::create_dir_all(dir)?;
        let issuer = Self::generate();
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options
            .open(dir.join(KEY_FILE))?
            .write_all(issuer.pem().as_bytes())?;
        std::fs::write(dir.join(JWKS_FILE), issuer.jwks())?;
        Ok(issuer)
    }

    /// The key kept in `dir` by [`LocalIssuer::load_or_create`].
    pub fn load(dir: &Path) -> std::io::Result<Self> {
        let path = dir.join(KEY_FILE);
        let pem = std::fs::read_to_string(&path)?;
        let body: String = pem
            .lines()
            .filter(|line| !line.starts_with("-----"))
            .collect();
        let invalid = |detail: String| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {detail}", path.display()),
            )
        };
        let der = base64::engine::general_purpose::STANDARD
            .decode(body.trim())
            .map_err(|error| invalid(error.to_string()))?;
        let issuer = Self::from_pkcs8(der).map_err(invalid)?;
        // The public half may have been deleted or be stale: write it again.
        if std::fs::read_to_string(dir.join(JWKS_FILE)).ok() != Some(issuer.jwks()) {
            std::fs::write(dir.join(JWKS_FILE), issuer.jwks())?;
        }
        Ok(issuer)
    }

    /// Where [`LocalIssuer::load_or_create`] writes the public keys.
    pub fn jwks_path(dir: &Path) -> std::path::PathBuf {
        dir.join(JWKS_FILE)
    }

    fn pem(&self) -> String {
        let body = base64::engine::general_purpose::STANDARD.encode(&self.pkcs8);
        let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
        for line in body.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        pem
    }

    /// The public key as a JSON Web Key Set.
    pub fn jwks(&self) -> String {
        serde_json::json!({"keys": [{
            "kty": "OKP",
            "crv": "Ed25519",
            "use": "sig",
            "alg": "EdDSA",
            "kid": self.kid,
            "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&self.public),
        }]})
        .to_string()
    }

    /// A service configuration that trusts this key (inline).
    pub fn auth_config(&self) -> AuthConfig {
        AuthConfig::inline(self.jwks(), LOCAL_ISSUER, LOCAL_AUDIENCE)
    }

    /// A token for `subject` with `roles`, valid for `ttl`.
    pub fn token(&self, subject: &str, roles: &[&str], ttl: Duration) -> String {
        let now = now();
        self.sign(&serde_json::json!({
            "iss": LOCAL_ISSUER,
            "aud": LOCAL_AUDIENCE,
            "sub": subject,
            "roles": roles,
            "iat": now,
            "nbf": now,
            "exp": now + ttl.as_secs(),
        }))
    }

    /// An administrator's token, valid for an hour.
    pub fn admin_token(&self) -> String {
        self.token("admin", &[crate::roles::ADMIN], Duration::from_secs(3600))
    }

    /// A customer's token for `user_id`, valid for an hour.
    pub fn user_token(&self, user_id: &str) -> String {
        self.token(user_id, &[], Duration::from_secs(3600))
    }

    /// `claims` signed as they are (for tests of what the services refuse).
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_ed_der(&self.pkcs8))
            .expect("an Ed25519 key signs")
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
