//! The shop's public contract, generated from `proto/` at build time.
//!
//! - [`user::v1`], [`order::v1`], [`inventory::v1`], [`payment::v1`]: each
//!   package's messages, its gRPC client (`*_client`) and server (`*_server`),
//!   and the events that service publishes.
//! - [`Event`]: the messaging runtime's trait, implemented here for each
//!   saga event: its CloudEvents type and its subject.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors of every file, for gRPC
//!   server reflection.
//!
//! Services convert these types to their domain types at the edge; nothing
//! past a service's gRPC or event adapter should handle them.

/// `shop.user.v1`: the user service and `UserCreated`.
pub mod user {
    /// Version 1 of the package.
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub, clippy::all)]
        tonic::include_proto!("shop.user.v1");
    }
}

/// `shop.order.v1`: the order service and the order events.
pub mod order {
    /// Version 1 of the package.
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub, clippy::all)]
        tonic::include_proto!("shop.order.v1");
    }
}

/// `shop.inventory.v1`: the inventory service and the inventory events.
pub mod inventory {
    /// Version 1 of the package.
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub, clippy::all)]
        tonic::include_proto!("shop.inventory.v1");
    }
}

/// `shop.payment.v1`: the payment service and the payment events.
pub mod payment {
    /// Version 1 of the package.
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub, clippy::all)]
        tonic::include_proto!("shop.payment.v1");
    }
}

/// A saga event, as the messaging runtime knows it: a protobuf message
/// published on one subject of its producer's stream.
pub use pg_jetstream::Event;

macro_rules! events {
    ($($event:ty => $type:literal on $subject:literal;)*) => {
        $(impl Event for $event {
            const TYPE: &'static str = $type;
            const SUBJECT: &'static str = $subject;
        })*

        /// Every event of the contract as (`ce-type`, subject).
        pub const EVENTS: &[(&str, &str)] = &[$(($type, $subject)),*];

        /// Every event of the contract, each routed one at a time to
        /// `S`'s handler: what a consumer of all of them accepts or
        /// refuses before any handler runs (`Router::check`), for tests
        /// and fuzzing.
        pub fn contract_router<S>() -> pg_jetstream::Router<S>
        where
            S: Send + Sync + 'static,
            $(S: pg_jetstream::Handler<$event>,)*
        {
            pg_jetstream::Router::new()
                $(.on::<$event>(pg_jetstream::Route::single()))*
        }
    };
}

events! {
    user::v1::UserCreated => "shop.user.v1.UserCreated" on "user.created";
    order::v1::OrderPlaced => "shop.order.v1.OrderPlaced" on "order.placed";
    order::v1::OrderConfirmed => "shop.order.v1.OrderConfirmed" on "order.confirmed";
    order::v1::OrderCancelled => "shop.order.v1.OrderCancelled" on "order.cancelled";
    inventory::v1::InventoryReserved => "shop.inventory.v1.InventoryReserved" on "inventory.reserved";
    inventory::v1::InventoryRejected => "shop.inventory.v1.InventoryRejected" on "inventory.rejected";
    inventory::v1::InventoryReleased => "shop.inventory.v1.InventoryReleased" on "inventory.released";
    payment::v1::PaymentCompleted => "shop.payment.v1.PaymentCompleted" on "payment.completed";
    payment::v1::PaymentFailed => "shop.payment.v1.PaymentFailed" on "payment.failed";
    payment::v1::PaymentRefunded => "shop.payment.v1.PaymentRefunded" on "payment.refunded";
}

/// The encoded `google.protobuf.FileDescriptorSet` of every file in `proto/`
/// (well-known imports included), as gRPC server reflection wants it.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/shop_descriptor.bin"));

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    #[test]
    fn descriptor_set_names_every_service_and_event() {
        let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
        let mut services = Vec::new();
        let mut messages = Vec::new();
        // The events: the messages of the events files that no message
        // uses as a field's type.
        let mut events = Vec::new();
        let mut field_types = Vec::new();
        for file in &set.file {
            let package = file.package();
            for message in &file.message_type {
                field_types.extend(
                    message
                        .field
                        .iter()
                        .map(|field| field.type_name().trim_start_matches('.').to_owned()),
                );
            }
            if file.name().ends_with("/events.proto") {
                events.extend(
                    file.message_type
                        .iter()
                        .map(|message| format!("{package}.{}", message.name())),
                );
            }
            for service in &file.service {
                let methods: Vec<_> = service.method.iter().map(|m| m.name().to_owned()).collect();
                services.push((format!("{package}.{}", service.name()), methods));
            }
            for message in &file.message_type {
                messages.push(format!("{package}.{}", message.name()));
            }
        }
        let expected_services: &[(&str, &[&str])] = &[
            (
                "shop.user.v1.UserService",
                &["CreateUser", "GetUser", "ListUsers"],
            ),
            (
                "shop.order.v1.OrderService",
                &["PlaceOrder", "GetOrder", "ListOrders"],
            ),
            (
                "shop.inventory.v1.InventoryService",
                &["CreateProduct", "GetProduct", "AddStock", "ListProducts"],
            ),
            (
                "shop.payment.v1.PaymentService",
                &["GetAccount", "Deposit", "GetPayment"],
            ),
        ];
        for (name, methods) in expected_services {
            let (_, found) = services
                .iter()
                .find(|(service, _)| service == name)
                .unwrap_or_else(|| panic!("{name} missing from the descriptor set"));
            assert_eq!(found, methods, "RPCs of {name}");
        }
        events.retain(|event| !field_types.contains(event));
        let listed: Vec<&str> = EVENTS.iter().map(|(event, _)| *event).collect();
        let missing: Vec<&String> = events
            .iter()
            .filter(|event| !listed.contains(&event.as_str()))
            .collect();
        let extra: Vec<&&str> = listed
            .iter()
            .filter(|event| !events.iter().any(|known| known == *event))
            .collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "events of proto/*/events.proto missing from the events! table: {missing:?}; \
             in the table but in no events.proto: {extra:?}"
        );
        for (event, subject) in EVENTS {
            assert!(messages.iter().any(|m| m == event), "{event} missing");
            // Each event lives in its producer's package, and is published on
            // that producer's stream.
            let producer = event.split('.').nth(1).unwrap();
            assert!(
                subject.starts_with(&format!("{producer}.")),
                "{event} on {subject}"
            );
        }
    }

    #[test]
    fn generated_messages_round_trip_with_unknown_fields_ignored() {
        let placed = order::v1::OrderPlaced {
            order_id: "0190f0c2-0000-7000-8000-000000000001".into(),
            user_id: "0190f0c2-0000-7000-8000-000000000002".into(),
            items: vec![order::v1::OrderItem {
                sku: "SKU-1".into(),
                quantity: 2,
            }],
            placed_at: None,
            deadline: None,
        };
        let bytes = placed.encode_to_vec();
        assert_eq!(
            order::v1::OrderPlaced::decode(bytes.as_slice()).unwrap(),
            placed
        );

        // A newer producer may add fields: an older consumer still decodes the rest.
        let mut newer = bytes.clone();
        prost::encoding::string::encode(99, &"added later".to_owned(), &mut newer);
        assert_eq!(
            order::v1::OrderPlaced::decode(newer.as_slice()).unwrap(),
            placed
        );
    }
}
