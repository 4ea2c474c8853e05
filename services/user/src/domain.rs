//! A customer's validated fields. Pure: no I/O.

/// An email address that passed a syntax check: one `@`, a non-empty local
/// part, a domain with a dot, no spaces, at most 254 characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Email(String);

impl Email {
    pub(crate) fn parse(value: &str) -> Result<Self, String> {
        let value = value.trim();
        if value.is_empty() {
            return Err("email is required".into());
        }
        if value.contains('\0') {
            return Err("email must not contain NUL characters".into());
        }
        if value.chars().count() > 254 {
            return Err("email must be at most 254 characters".into());
        }
        let valid = match value.split_once('@') {
            Some((local, domain)) => {
                !local.is_empty()
                    && !domain.contains('@')
                    && domain.contains('.')
                    && !domain.starts_with('.')
                    && !domain.ends_with('.')
                    && !domain.contains("..")
                    && !value.chars().any(|c| c.is_whitespace() || c.is_control())
            }
            None => false,
        };
        if !valid {
            return Err(format!("email {value:?} is not a valid address"));
        }
        Ok(Self(value.to_owned()))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// The form compared for uniqueness: addresses differing only in case are
    /// the same user.
    pub(crate) fn key(&self) -> String {
        self.0.to_lowercase()
    }
}

/// A display name of 1 to 200 characters, trimmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UserName(String);

impl UserName {
    pub(crate) fn parse(value: &str) -> Result<Self, String> {
        let value = value.trim();
        if value.contains('\0') {
            return Err("name must not contain NUL characters".into());
        }
        match value.chars().count() {
            0 => Err("name is required".into()),
            n if n > 200 => Err(format!("name must be at most 200 characters, got {n}")),
            _ => Ok(Self(value.to_owned())),
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_emails() {
        for email in ["ann@example.com", "a.b+tag@sub.example.org", " ann@x.io "] {
            assert!(Email::parse(email).is_ok(), "{email}");
        }
        assert_eq!(
            Email::parse("Ann@Example.COM").unwrap().key(),
            "ann@example.com"
        );
    }

    #[test]
    fn invalid_emails_say_why() {
        for email in [
            "",
            "ann",
            "@x.io",
            "ann@",
            "ann@x",
            "ann@@x.io",
            "a nn@x.io",
            "ann@.x.io",
            "ann@x..io",
            "ann@x.io.",
        ] {
            let error = Email::parse(email).unwrap_err();
            assert!(error.contains("email"), "{email}: {error}");
        }
        assert!(
            Email::parse(&format!("{}@x.io", "a".repeat(260)))
                .unwrap_err()
                .contains("254")
        );
    }

    #[test]
    fn names_are_one_to_two_hundred_characters() {
        assert_eq!(UserName::parse("  Ann  ").unwrap().as_str(), "Ann");
        assert_eq!(UserName::parse("   ").unwrap_err(), "name is required");
        assert!(UserName::parse(&"é".repeat(200)).is_ok());
        assert!(
            UserName::parse(&"é".repeat(201))
                .unwrap_err()
                .contains("200")
        );
    }
}
