//! The provider's books: every payment and refund it made, and what each
//! idempotency key answered.

use std::collections::HashMap;

use serde::Serialize;

/// A payment as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Payment {
    /// `pay_<n>`.
    pub id: String,
    /// `succeeded` or `declined`.
    pub status: String,
    pub amount_cents: i64,
    pub currency: String,
    /// The merchant's own reference (the shop's order id).
    pub reference: String,
    /// Why it was declined; empty otherwise.
    pub decline_code: String,
    /// Refunded so far.
    pub refunded_cents: i64,
    /// Unix seconds.
    pub created: i64,
}

/// A refund as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Refund {
    /// `re_<n>`.
    pub id: String,
    pub payment_id: String,
    /// The payment's reference, so that a webhook names the order.
    pub reference: String,
    pub amount_cents: i64,
    /// Always `succeeded`: refunds here do not fail once accepted.
    pub status: String,
    pub created: i64,
}

/// What a key answered, or that its first request is still running.
#[derive(Debug, Clone)]
enum Keyed {
    Running {
        fingerprint: String,
    },
    Answered {
        fingerprint: String,
        body: serde_json::Value,
    },
}

/// Where a request under an idempotency key stands.
#[derive(Debug)]
pub(crate) enum Begin {
    /// First use: go on, then [`Ledger::answer`] or [`Ledger::forget`].
    New,
    /// The key answered before, with these parameters: the same answer.
    Replay(serde_json::Value),
    /// The key was used with other parameters.
    Mismatch,
    /// The key's first request has not answered yet.
    Running,
}

#[derive(Debug, Default)]
pub(crate) struct Ledger {
    pub(crate) payments: Vec<Payment>,
    pub(crate) refunds: Vec<Refund>,
    keys: HashMap<String, Keyed>,
}

impl Ledger {
    /// Starts a request under `key` (scoped by the caller to the endpoint).
    pub(crate) fn begin(&mut self, key: &str, fingerprint: &str) -> Begin {
        match self.keys.get(key) {
            None => {
                self.keys.insert(
                    key.to_owned(),
                    Keyed::Running {
                        fingerprint: fingerprint.to_owned(),
                    },
                );
                Begin::New
            }
            Some(Keyed::Answered { fingerprint: f, .. } | Keyed::Running { fingerprint: f })
                if f != fingerprint =>
            {
                Begin::Mismatch
            }
            Some(Keyed::Running { .. }) => Begin::Running,
            Some(Keyed::Answered { body, .. }) => Begin::Replay(body.clone()),
        }
    }

    /// Keeps the answer of a request begun under `key`.
    pub(crate) fn answer(&mut self, key: &str, body: serde_json::Value) {
        if let Some(Keyed::Running { fingerprint }) = self.keys.remove(key) {
            self.keys
                .insert(key.to_owned(), Keyed::Answered { fingerprint, body });
        }
    }

    /// Forgets a request begun under `key` that did nothing (a refusal
    /// before any effect): the key may be used again.
    pub(crate) fn forget(&mut self, key: &str) {
        if let Some(Keyed::Running { .. }) = self.keys.get(key) {
            self.keys.remove(key);
        }
    }

    pub(crate) fn payment_mut(&mut self, id: &str) -> Option<&mut Payment> {
        let n: usize = id.strip_prefix("pay_")?.parse().ok()?;
        self.payments.get_mut(n.checked_sub(1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::{Begin, Ledger};

    #[test]
    fn a_key_answers_once_and_only_for_the_same_parameters() {
        let mut ledger = Ledger::default();
        assert!(matches!(ledger.begin("k", "a"), Begin::New));
        assert!(matches!(ledger.begin("k", "a"), Begin::Running));
        assert!(matches!(ledger.begin("k", "b"), Begin::Mismatch));
        ledger.answer("k", serde_json::json!({"id": "pay_1"}));
        assert!(matches!(ledger.begin("k", "a"), Begin::Replay(body) if body["id"] == "pay_1"));
        assert!(matches!(ledger.begin("k", "b"), Begin::Mismatch));
        // A request that did nothing frees its key.
        assert!(matches!(ledger.begin("j", "a"), Begin::New));
        ledger.forget("j");
        assert!(matches!(ledger.begin("j", "b"), Begin::New));
    }
}
