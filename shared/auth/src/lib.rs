//! Who is calling, and what they may do.
//!
//! The services only verify tokens; an identity provider (Keycloak, Auth0,
//! Dex, ... in production; [`LocalIssuer`] on a laptop and in tests) signs
//! them.
//!
//! - [`AuthConfig`]: the flags (`--jwks-file`, `--jwks-url`, `--jwks`,
//!   `--jwt-issuer`, `--jwt-audience`, `--jwt-roles-claim`).
//! - [`Verifier`]: checks a bearer JWT against the trusted keys (asymmetric
//!   algorithms only; `exp`, `nbf`, `iss`, `aud` and `sub` required, with a
//!   small clock skew) and yields its [`Caller`]. Keys from a URL are cached
//!   and refreshed, and fetched again when a token names a key not seen yet.
//! - [`Caller`]: the token's subject (a customer's `user_id`) and roles, and
//!   the one-line checks a use case makes ([`Caller::require_role`],
//!   [`Caller::require_user`]).
//! - [`AuthLayer`]: the tower layer in front of every gRPC service; it
//!   refuses a call without a valid token with `UNAUTHENTICATED` before any
//!   handler runs, and hands the [`Caller`] on in the request's extensions.
//!   `grpc.health.v1` and server reflection stay open.
//! - [`Bearer`]: the client side, an interceptor that sends a token.
//! - [`LocalIssuer`]: an Ed25519 signing key kept in a directory, its JWKS,
//!   and tokens signed with it (`shopctl token`).

mod caller;
mod config;
mod error;
mod fetch;
mod issuer;
mod layer;
mod verifier;

pub use caller::{Caller, Denied, roles};
pub use config::AuthConfig;
pub use error::AuthError;
pub use issuer::{LOCAL_AUDIENCE, LOCAL_ISSUER, LocalIssuer};
pub use layer::{AuthLayer, Authenticated, Bearer, BearerChannel, caller_of, with_token};
pub use verifier::Verifier;
