//! What a consumer makes of arbitrary messages, before any handler runs:
//! generated subjects, headers and bodies (hostile and well-formed) never
//! panic the parsing, routing and decoding of `Router::check`; whatever it
//! accepts is a contract event on its own subject; every well-formed event
//! is accepted. `shared/pg-jetstream/fuzz` drives the same code with libFuzzer.

use async_nats::HeaderMap;
use pg_jetstream::envelope::headers;
use pg_jetstream::{Context, Event, Handler, HandlerError, Route, Router};
use proptest::prelude::*;
use proptest::sample::select;

use crate::events::{OrderConfirmed, OrderPlaced};

/// Every event of the tests' contract as (`ce-type`, subject).
const EVENTS: &[(&str, &str)] = &[
    (OrderPlaced::TYPE, OrderPlaced::SUBJECT),
    (OrderConfirmed::TYPE, OrderConfirmed::SUBJECT),
];

/// Takes every event of the contract, does nothing.
struct Contract;

impl<E: Event> Handler<E> for Contract {
    async fn handle(&self, _: &mut Context<'_>, _: E) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// Every event of the contract, each routed to [`Contract`]: what a
/// consumer of all of them would accept or refuse.
fn contract_router() -> Router<Contract> {
    Router::new()
        .on::<OrderPlaced>(Route::single())
        .on::<OrderConfirmed>(Route::single())
}

/// A header value: a valid one for its header, or anything.
fn value(valid: String) -> impl Strategy<Value = Option<String>> {
    let awkward = select(vec![
        'a', '0', '-', ':', ' ', '\t', 'é', '😀', '\u{7f}', '\u{0}', 'T', 'Z', '+',
    ]);
    prop_oneof![
        4 => Just(Some(valid)),
        1 => Just(None),
        1 => Just(Some(String::new())),
        2 => proptest::collection::vec(awkward, 0..60).prop_map(|c| Some(String::from_iter(c))),
    ]
}

/// A message as it could arrive: (subject, headers, body, well-formed).
fn message() -> impl Strategy<Value = (String, HeaderMap, Vec<u8>, bool)> {
    let event = select(EVENTS.to_vec());
    let other_subject = select(vec!["order.placed", "order.shipped", "nope", "", "a.b.c"]);
    (
        event,
        prop_oneof![3 => Just(None), 1 => other_subject.prop_map(Some)],
        prop_oneof![3 => Just(None), 1 => select(EVENTS.to_vec()).prop_map(|(t, _)| Some(t))],
        value("1.0".into()),
        value(uuid::Uuid::now_v7().to_string()),
        value("example/order".into()),
        value("2026-12-01T10:00:00.123456Z".into()),
        value(uuid::Uuid::now_v7().to_string()),
        value("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        prop_oneof![
            Just(Vec::new()),
            proptest::collection::vec(any::<u8>(), 0..200),
            // A field 1 string: a valid prefix of most events.
            Just(vec![0x0a, 0x03, b'a', b'b', b'c']),
        ],
    )
        .prop_map(
            |(
                (event_type, subject),
                moved,
                retyped,
                spec,
                id,
                source,
                time,
                causation,
                traceparent,
                body,
            )| {
                let mut map = HeaderMap::new();
                let well_formed = moved.is_none()
                    && retyped.is_none()
                    && spec.as_deref() == Some("1.0")
                    && id
                        .as_deref()
                        .is_some_and(|id| uuid::Uuid::parse_str(id).is_ok())
                    && source.as_deref().is_some_and(|s| !s.is_empty())
                    && time.as_deref() == Some("2026-12-01T10:00:00.123456Z")
                    && causation
                        .as_deref()
                        .is_none_or(|c| c.is_empty() || uuid::Uuid::parse_str(c).is_ok())
                    && body.is_empty();
                for (name, value) in [
                    (headers::SPEC_VERSION, spec),
                    (headers::ID, id),
                    (
                        headers::TYPE,
                        Some(retyped.unwrap_or(event_type).to_owned()),
                    ),
                    (headers::SOURCE, source),
                    (headers::TIME, time),
                    (headers::CAUSATION_ID, causation),
                    (headers::TRACEPARENT, traceparent),
                ] {
                    if let Some(value) = value {
                        map.insert(name, value.as_str());
                    }
                }
                let subject = moved.unwrap_or(subject).to_owned();
                (subject, map, body, well_formed)
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 5000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_message_is_accepted_ignored_or_refused_with_a_reason(
        (subject, headers, body, well_formed) in message()
    ) {
        let router = contract_router();
        let verdict = router.check(&subject, Some(&headers), body.into());
        match &verdict {
            Ok(Some(event_type)) => prop_assert!(
                EVENTS.contains(&(event_type.as_str(), subject.as_str())),
                "accepted {event_type} on {subject}"
            ),
            Ok(None) => {}
            Err(reason) => prop_assert!(!reason.is_empty()),
        }
        // An empty body is every event at its defaults.
        if well_formed {
            prop_assert!(matches!(verdict, Ok(Some(_))), "{verdict:?}");
        }
    }
}

#[test]
fn a_message_without_headers_is_refused_naming_the_first_missing_one() {
    let verdict = contract_router().check("order.placed", None, Vec::new().into());
    assert_eq!(verdict, Err("missing header ce-specversion".to_owned()));
}
