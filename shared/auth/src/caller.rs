//! The authenticated caller and the checks use cases make.

/// The roles the shop knows. A token carries them in its roles claim
/// (`roles` unless configured otherwise); unknown roles are ignored.
pub mod roles {
    /// Operators and back-office tools: every call, on anyone's behalf.
    pub const ADMIN: &str = "admin";
    /// A payment provider's integration: `Deposit` into any wallet, and
    /// nothing else.
    pub const PAYMENT_PROVIDER: &str = "payment-provider";
}

/// Who is calling: the verified token's subject and roles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    subject: String,
    roles: Vec<String>,
}

/// Why an authenticated caller may not do what it asked: `PERMISSION_DENIED`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denied(String);

impl Caller {
    /// A caller with `subject` and `roles`.
    pub fn new(subject: impl Into<String>, roles: Vec<String>) -> Self {
        Self {
            subject: subject.into(),
            roles,
        }
    }

    /// The token's subject: for a customer, their `user_id`.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The subject as a user id, if it is one.
    pub fn user_id(&self) -> Option<uuid::Uuid> {
        uuid::Uuid::parse_str(&self.subject).ok()
    }

    /// Whether the token carries `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// Whether the caller is an administrator.
    pub fn is_admin(&self) -> bool {
        self.has_role(roles::ADMIN)
    }

    /// Allowed when the caller has one of `roles` (admin always does);
    /// `action` names what was refused, for the message.
    pub fn require_role(&self, action: &str, roles: &[&str]) -> Result<(), Denied> {
        if self.is_admin() || roles.iter().any(|role| self.has_role(role)) {
            return Ok(());
        }
        let mut needed = vec![roles::ADMIN];
        needed.extend(roles.iter().copied().filter(|r| *r != roles::ADMIN));
        Err(Denied(format!(
            "{action} needs the role {}",
            needed.join(" or ")
        )))
    }

    /// Allowed when the caller is the user `user_id` or an administrator.
    pub fn require_user(&self, user_id: uuid::Uuid) -> Result<(), Denied> {
        if self.is_admin() || self.user_id() == Some(user_id) {
            return Ok(());
        }
        Err(Denied(format!(
            "this token may act only for its own user, not for user {user_id}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn customer(id: uuid::Uuid) -> Caller {
        Caller::new(id.to_string(), vec![])
    }

    #[test]
    fn a_customer_acts_only_for_themselves() {
        let (ann, bob) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        assert!(customer(ann).require_user(ann).is_ok());
        let denied = customer(ann).require_user(bob).unwrap_err();
        assert!(denied.to_string().contains(&bob.to_string()), "{denied}");
        assert!(customer(ann).require_role("Deposit", &[]).is_err());
    }

    #[test]
    fn an_admin_acts_for_anyone_and_roles_are_exact() {
        let admin = Caller::new("ops", vec![roles::ADMIN.into()]);
        assert!(admin.require_user(uuid::Uuid::now_v7()).is_ok());
        assert!(admin.require_role("AddStock", &[]).is_ok());
        let provider = Caller::new("psp", vec![roles::PAYMENT_PROVIDER.into()]);
        assert!(
            provider
                .require_role("Deposit", &[roles::PAYMENT_PROVIDER])
                .is_ok()
        );
        assert!(provider.require_user(uuid::Uuid::now_v7()).is_err());
        let denied = provider.require_role("AddStock", &[]).unwrap_err();
        assert_eq!(denied.to_string(), "AddStock needs the role admin");
        let lookalike = Caller::new("x", vec!["Admin".into(), "admins".into()]);
        assert!(!lookalike.is_admin());
    }
}
