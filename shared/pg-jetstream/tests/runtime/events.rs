//! The events these tests send, a small contract of their own: an order is
//! placed, then confirmed.

use pg_jetstream::Event;

/// An order was placed.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct OrderPlaced {
    #[prost(string, tag = "1")]
    pub(crate) order_id: String,
    #[prost(string, tag = "2")]
    pub(crate) user_id: String,
}

impl Event for OrderPlaced {
    const TYPE: &'static str = "example.order.v1.OrderPlaced";
    const SUBJECT: &'static str = "order.placed";
}

/// An order was confirmed.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct OrderConfirmed {
    #[prost(string, tag = "1")]
    pub(crate) order_id: String,
    #[prost(string, tag = "2")]
    pub(crate) user_id: String,
    #[prost(int64, tag = "3")]
    pub(crate) total_cents: i64,
}

impl Event for OrderConfirmed {
    const TYPE: &'static str = "example.order.v1.OrderConfirmed";
    const SUBJECT: &'static str = "order.confirmed";
}
