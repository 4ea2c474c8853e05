//! How `shopctl`'s commands authenticate to the services: a token given to
//! them, or tokens they sign with the local key `shopctl up` made.

use std::path::PathBuf;

use anyhow::Context as _;
use shop_auth::LocalIssuer;

/// Where a command gets its tokens.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Credentials {
    /// A bearer token for every call (an administrator's, from your identity
    /// provider). Without one, tokens are signed with the local key.
    #[arg(long, env = "SHOP_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The local signing key's directory, made by `shopctl up`.
    #[arg(long, env = "SHOP_KEY_DIR", default_value = ".shop/auth")]
    key_dir: PathBuf,
}

impl Credentials {
    fn issuer(&self) -> anyhow::Result<LocalIssuer> {
        LocalIssuer::load(&self.key_dir).with_context(|| {
            format!(
                "no token: give --token (SHOP_TOKEN), or run where `shopctl up` keeps its key ({} not readable)",
                self.key_dir.display()
            )
        })
    }

    /// An administrator's token.
    pub(crate) fn admin(&self) -> anyhow::Result<String> {
        match &self.token {
            Some(token) => Ok(token.clone()),
            None => Ok(self.issuer()?.admin_token()),
        }
    }

    /// A token that acts for `user_id`: the customer's own when signing
    /// locally, else the given (administrator's) token.
    pub(crate) fn user(&self, user_id: &str) -> anyhow::Result<String> {
        match &self.token {
            Some(token) => Ok(token.clone()),
            None => Ok(self.issuer()?.user_token(user_id)),
        }
    }
}
