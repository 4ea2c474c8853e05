//! What a consumer makes of any message off the wire, before any handler
//! runs: the subject, the headers (the envelope's, with values of any kind,
//! and others) and the body come from the fuzzer's bytes. Parsing, routing,
//! the subject check, decoding and the trace context must never panic, and
//! what is accepted must be a contract event on its own subject.

#![no_main]

use async_nats::HeaderMap;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use pg_jetstream::envelope::headers;
use pg_jetstream::{Context, Event, Handler, HandlerError};
use shop_proto::{EVENTS, contract_router};

/// Takes every event, does nothing.
struct Contract;

impl<E: Event> Handler<E> for Contract {
    async fn handle(&self, _: &mut Context<'_>, _: E) -> Result<(), HandlerError> {
        Ok(())
    }
}

const NAMES: [&str; 10] = [
    headers::SPEC_VERSION,
    headers::ID,
    headers::TYPE,
    headers::SOURCE,
    headers::TIME,
    headers::CORRELATION_ID,
    headers::CAUSATION_ID,
    headers::TRACEPARENT,
    headers::TRACESTATE,
    headers::CONTENT_TYPE,
];

/// A value the fuzzer writes, or (often) a valid one it may then spoil.
fn value(u: &mut Unstructured<'_>, name: &str) -> Result<String> {
    let valid = match name {
        headers::SPEC_VERSION => "1.0".to_owned(),
        headers::ID | headers::CAUSATION_ID => "0190f0c2-0000-7000-8000-000000000001".to_owned(),
        headers::TYPE => u.choose(EVENTS)?.0.to_owned(),
        headers::TIME => "2026-12-01T10:00:00.123456Z".to_owned(),
        headers::TRACEPARENT => {
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned()
        }
        _ => "shop/order".to_owned(),
    };
    let mut value = if u.ratio(2, 3)? {
        valid
    } else {
        u.arbitrary::<String>()?
    };
    if u.ratio(1, 8)? && !value.is_empty() {
        let at = u.choose_index(value.len())?;
        let at = (0..=at)
            .rev()
            .find(|&i| value.is_char_boundary(i))
            .unwrap_or(0);
        value.insert(at, u.arbitrary::<char>()?);
    }
    // NATS header values cannot hold line breaks.
    Ok(value.replace(['\r', '\n'], ""))
}

fn message(u: &mut Unstructured<'_>) -> Result<(String, HeaderMap, Vec<u8>)> {
    let subject = if u.ratio(3, 4)? {
        u.choose(EVENTS)?.1.to_owned()
    } else {
        u.arbitrary::<String>()?
    };
    let mut map = HeaderMap::new();
    for _ in 0..u.int_in_range(0..=12)? {
        let name = if u.ratio(7, 8)? {
            (*u.choose(&NAMES)?).to_owned()
        } else {
            let name: String = u.arbitrary()?;
            // What NATS allows in a header name.
            if name.is_empty() || name.contains(|c: char| !c.is_ascii_graphic() || c == ':') {
                continue;
            }
            name
        };
        let value = value(u, &name)?;
        map.insert(name.as_str(), value.as_str());
    }
    Ok((subject, map, u.bytes(u.len())?.to_vec()))
}

fuzz_target!(|data: &[u8]| {
    let Ok((subject, headers, body)) = message(&mut Unstructured::new(data)) else {
        return;
    };
    let router = contract_router::<Contract>();
    if let Ok(Some(event_type)) = router.check(&subject, Some(&headers), body.into()) {
        assert!(
            EVENTS.contains(&(event_type.as_str(), subject.as_str())),
            "accepted {event_type} on {subject}"
        );
    }
    // The consumer continues the producer's trace from these headers.
    let span = tracing::Span::none();
    pg_jetstream::telemetry::continue_from(
        &span,
        headers.get(headers::TRACEPARENT).map(|v| v.as_str()),
        headers.get(headers::TRACESTATE).map(|v| v.as_str()),
    );
});
