//! `shopctl token`: a token signed with the local key, for grpcurl.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use shop_auth::{LocalIssuer, roles};

/// Options of `shopctl token`.
#[derive(Debug, clap::Args)]
pub(crate) struct Token {
    /// An administrator's token (every call, on anyone's behalf).
    #[arg(long, conflicts_with = "user", required_unless_present = "user")]
    admin: bool,
    /// A customer's token: acts only for this user id.
    #[arg(long, value_name = "USER_ID")]
    user: Option<String>,
    /// More roles to put in the token (e.g. `payment-provider`).
    #[arg(long = "role", value_name = "ROLE")]
    roles: Vec<String>,
    /// How long the token is valid: seconds, or with a unit (`90s`, `30m`,
    /// `12h`, `7d`).
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    ttl: Duration,
    /// The local signing key's directory, made by `shopctl up`.
    #[arg(long, env = "SHOP_KEY_DIR", default_value = ".shop/auth")]
    key_dir: PathBuf,
}

impl Token {
    pub(crate) fn run(self) -> anyhow::Result<()> {
        let issuer = LocalIssuer::load(&self.key_dir).with_context(|| {
            format!(
                "reading the local signing key in {} (`shopctl up` makes it)",
                self.key_dir.display()
            )
        })?;
        let (subject, mut granted) = match (&self.user, self.admin) {
            (Some(user), _) => {
                uuid::Uuid::parse_str(user)
                    .with_context(|| format!("--user must be a user id (a UUID), got {user:?}"))?;
                (user.clone(), Vec::new())
            }
            (None, _) => ("admin".to_owned(), vec![roles::ADMIN.to_owned()]),
        };
        granted.extend(self.roles);
        let granted: Vec<&str> = granted.iter().map(String::as_str).collect();
        println!("{}", issuer.token(&subject, &granted, self.ttl));
        Ok(())
    }
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 3600, 90s, 30m, 12h or 7d"))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("unknown unit {other:?}: use s, m, h or d")),
    };
    let ttl = number
        .checked_mul(seconds)
        .filter(|&s| s > 0)
        .ok_or_else(|| format!("{text:?} is not a positive duration"))?;
    Ok(Duration::from_secs(ttl))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_read_as_people_write_them() {
        assert_eq!(parse_ttl("3600"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(604_800)));
        for bad in ["", "0", "1w", "h", "-5m", "99999999999999999999d"] {
            assert!(parse_ttl(bad).is_err(), "{bad:?}");
        }
    }
}

/// Options of `shopctl keygen`.
#[derive(Debug, clap::Args)]
pub(crate) struct Keygen {
    /// Where the signing key (private, `signing-key.pem`) goes.
    #[arg(long, env = "SHOP_KEY_DIR", default_value = ".shop/auth")]
    key_dir: PathBuf,
    /// Where the public keys (`jwks.json`) go as well, for the services to
    /// trust without seeing the private key.
    #[arg(long)]
    jwks_dir: Option<PathBuf>,
}

impl Keygen {
    pub(crate) fn run(self) -> anyhow::Result<()> {
        let issuer = LocalIssuer::load_or_create(&self.key_dir)
            .with_context(|| format!("making the signing key in {}", self.key_dir.display()))?;
        let mut written = vec![LocalIssuer::jwks_path(&self.key_dir)];
        if let Some(dir) = &self.jwks_dir {
            std::fs::create_dir_all(dir)?;
            let path = LocalIssuer::jwks_path(dir);
            std::fs::write(&path, issuer.jwks())
                .with_context(|| format!("writing {}", path.display()))?;
            written.push(path);
        }
        for path in written {
            println!("{}", path.display());
        }
        Ok(())
    }
}
