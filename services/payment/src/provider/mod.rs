//! Payments through an external provider: the port (what the payment step
//! needs of a provider), its HTTP adapter, the worker that makes the calls
//! outside any transaction, and the webhooks that report outcomes.
//!
//! The step: `inventory.reserved` records the intent (PENDING) and
//! commits; the [`steps::Worker`] then charges with the key
//! `charge-<order id>`, so that a retry after an unknown outcome (a
//! timeout, a 5xx, a lost connection) charges at most once; the outcome,
//! from the answer or from a webhook, whichever comes first, settles the
//! payment and emits `payment.completed` or `payment.failed`. A
//! cancellation of a captured order makes it REFUNDING, refunded with the
//! key `refund-<order id>`, then `payment.refunded`; a cancellation while
//! the charge is in flight refunds it once it succeeds.

pub(crate) mod http;
pub(crate) mod metrics;
pub(crate) mod steps;
pub(crate) mod webhook;

use secrecy::SecretString;

/// How the payment service takes payments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProviderKind {
    /// The shop's own wallets, debited in the step's statement.
    Wallet,
    /// A payment provider's HTTP API (`--provider-url`).
    Http,
}

/// The provider's settings.
#[derive(Debug, Clone, clap::Args)]
pub struct ProviderConfig {
    /// How payments are taken: `wallet` (the shop's own wallets) or `http`
    /// (a payment provider's API at `--provider-url`).
    #[arg(
        long = "payment-provider",
        env = "PAYMENT_PROVIDER",
        value_enum,
        default_value = "wallet"
    )]
    pub kind: ProviderKind,
    /// The provider's API, `https://` (plain `http://` only on loopback).
    #[arg(long, env = "PROVIDER_URL", required_if_eq("kind", "http"))]
    pub provider_url: Option<String>,
    /// The provider's API key (a secret).
    #[arg(long, env = "PROVIDER_API_KEY", hide_env_values = true, value_parser = secret,
          required_if_eq("kind", "http"))]
    pub provider_api_key: Option<SecretString>,
    /// The secret the provider signs webhooks with (a secret).
    #[arg(long, env = "PROVIDER_WEBHOOK_SECRET", hide_env_values = true, value_parser = secret,
          required_if_eq("kind", "http"))]
    pub provider_webhook_secret: Option<SecretString>,
    /// How long a call may take before its outcome counts as unknown.
    #[arg(long, env = "PROVIDER_TIMEOUT_MS", default_value_t = 5_000)]
    pub provider_timeout_ms: u64,
    /// The currency of every charge.
    #[arg(long, env = "PROVIDER_CURRENCY", default_value = "EUR")]
    pub provider_currency: String,
}

/// The wallet, the settings' defaults otherwise.
impl Default for ProviderConfig {
    fn default() -> Self {
        Self {
            kind: ProviderKind::Wallet,
            provider_url: None,
            provider_api_key: None,
            provider_webhook_secret: None,
            provider_timeout_ms: 5_000,
            provider_currency: "EUR".into(),
        }
    }
}

fn secret(value: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(value))
}

/// A payment as the provider reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub(crate) struct ProviderPayment {
    pub(crate) id: String,
    /// `succeeded` or `declined`.
    pub(crate) status: String,
    pub(crate) amount_cents: i64,
    /// The shop's order id.
    pub(crate) reference: String,
    #[serde(default)]
    pub(crate) decline_code: String,
    #[serde(default)]
    pub(crate) refunded_cents: i64,
}

/// A refund as the provider reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub(crate) struct ProviderRefund {
    pub(crate) id: String,
    pub(crate) payment_id: String,
    pub(crate) reference: String,
    pub(crate) amount_cents: i64,
}

/// A call's outcome.
#[derive(Debug)]
pub(crate) enum Outcome<T> {
    /// The provider answered.
    Done(T),
    /// The provider refused the request (400, 402, 422): trying again
    /// will not help.
    Refused(String),
    /// No answer, or one that does not say (a timeout, a 5xx, a lost
    /// connection, a request under the same key still running, a key or
    /// URL the provider does not take): the call may or may not have had
    /// its effect. Call again with the same key.
    Unknown(String),
}

impl<T> Outcome<T> {
    /// The outcome's name, for the metrics.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Self::Done(_) => "done",
            Self::Refused(_) => "refused",
            Self::Unknown(_) => "unknown",
        }
    }
}

/// What the payment step needs of a provider.
pub(crate) trait PaymentProvider: Send + Sync + 'static {
    /// Charges `amount_cents` for `reference` under `key`.
    fn charge(
        &self,
        key: &str,
        amount_cents: i64,
        reference: &str,
    ) -> impl Future<Output = Outcome<ProviderPayment>> + Send;

    /// Refunds what is left of `payment_id` under `key`.
    fn refund(
        &self,
        key: &str,
        payment_id: &str,
    ) -> impl Future<Output = Outcome<ProviderRefund>> + Send;
}

/// The key of an order's charge: the same on every attempt.
pub(crate) fn charge_key(order_id: uuid::Uuid) -> String {
    format!("charge-{order_id}")
}

/// The key of an order's refund.
pub(crate) fn refund_key(order_id: uuid::Uuid) -> String {
    format!("refund-{order_id}")
}
