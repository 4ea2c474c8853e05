//! The authentication flags every service takes.

use std::path::PathBuf;

/// Where the trusted keys come from and what a token must say.
///
/// Exactly one of `--jwks-file`, `--jwks-url` and `--jwks` names the keys.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthConfig {
    /// A JSON Web Key Set file holding the identity provider's public keys
    /// (read again when a token names a key it lacks).
    #[arg(long, env = "JWKS_FILE", conflicts_with_all = ["jwks_url", "jwks"])]
    pub jwks_file: Option<PathBuf>,
    /// The identity provider's JWKS URL (its `jwks_uri`), cached and
    /// refreshed every `--jwks-refresh-s` and when a token names a new key.
    /// `https://` only; plain `http://` only to this machine's loopback.
    #[arg(long, env = "JWKS_URL", conflicts_with = "jwks")]
    pub jwks_url: Option<String>,
    /// PEM CA certificates to trust, instead of the machine's roots, for
    /// `--jwks-url` (an identity provider behind a private CA).
    #[arg(long, env = "JWKS_CA", requires = "jwks_url")]
    pub jwks_ca: Option<PathBuf>,
    /// Fetch `--jwks-url` over plain `http://` from another machine: anyone
    /// on the path can then serve a key of their own and sign any token.
    #[arg(long, env = "ALLOW_INSECURE_JWKS_HTTP", requires = "jwks_url")]
    pub allow_insecure_jwks_http: bool,
    /// The JSON Web Key Set itself, inline.
    #[arg(long, env = "JWKS", hide_env_values = true)]
    pub jwks: Option<String>,
    /// The `iss` every token must carry.
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: String,
    /// The `aud` every token must name.
    #[arg(long, env = "JWT_AUDIENCE", default_value = "shop")]
    pub jwt_audience: String,
    /// Where the roles are in the token: a claim name, or a dotted path
    /// into nested claims (Keycloak: `realm_access.roles`).
    #[arg(long, env = "JWT_ROLES_CLAIM", default_value = "roles")]
    pub jwt_roles_claim: String,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    #[arg(long, env = "JWT_LEEWAY_S", default_value_t = 30)]
    pub jwt_leeway_s: u64,
    /// How often keys from `--jwks-url` are fetched again, in seconds.
    #[arg(long, env = "JWKS_REFRESH_S", default_value_t = 300)]
    pub jwks_refresh_s: u64,
}

impl AuthConfig {
    /// Trust `jwks` (a JSON Web Key Set) for tokens from `issuer` to
    /// `audience`, with the defaults otherwise.
    pub fn inline(jwks: String, issuer: &str, audience: &str) -> Self {
        Self {
            jwks_file: None,
            jwks_url: None,
            jwks_ca: None,
            allow_insecure_jwks_http: false,
            jwks: Some(jwks),
            jwt_issuer: issuer.to_owned(),
            jwt_audience: audience.to_owned(),
            jwt_roles_claim: "roles".into(),
            jwt_leeway_s: 30,
            jwks_refresh_s: 300,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::AuthConfig;

    #[derive(Debug, clap::Parser)]
    struct Service {
        #[command(flatten)]
        auth: AuthConfig,
    }

    #[test]
    fn one_key_source_with_an_issuer() {
        let parsed =
            Service::try_parse_from(["svc", "--jwks-file", "/k.json", "--jwt-issuer", "idp"])
                .unwrap();
        assert_eq!(parsed.auth.jwt_issuer, "idp");
        assert_eq!(parsed.auth.jwt_audience, "shop");
        assert!(Service::try_parse_from(["svc", "--jwks-url", "https://idp/certs"]).is_err());
        assert!(
            Service::try_parse_from([
                "svc",
                "--jwks-file",
                "/k.json",
                "--jwks-url",
                "https://idp/certs",
                "--jwt-issuer",
                "idp",
            ])
            .is_err()
        );
    }
}
