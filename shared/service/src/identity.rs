//! Who a service is, written once.

use crate::Ports;

/// A service's name, its stream and its default ports: one constant per
/// service (`shop_order::SERVICE`, ...) that everything naming the service
/// takes them from. The name is its durable consumers' name, its NATS user,
/// the prefix of the subjects it publishes (`order.>`), its outbox's
/// `ce-source` (`shop/order`), the suffix of its database (`shop_order`) and
/// the label of its logs and metrics; the gRPC service names come from the
/// generated servers themselves.
/// `integration-tests/tests/services/identities.rs` checks that the NATS
/// configuration, the chart and `compose.yaml` agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// `user`, `order`, `inventory` or `payment`.
    pub name: &'static str,
    /// The stream of the events it publishes: `USER`, `ORDER`, ...
    pub stream: &'static str,
    /// Where it listens unless configured otherwise.
    pub ports: Ports,
}

impl Identity {
    /// The `ce-source` of the events it publishes.
    pub fn source(&self) -> String {
        format!("shop/{}", self.name)
    }
}
