//! The diesel view of the outbox and inbox tables (`shared/pg-jetstream/migrations/`).

diesel::table! {
    outbox (event_id) {
        event_id -> Uuid,
        seq -> Int8,
        subject -> Text,
        event_type -> Text,
        source -> Text,
        payload -> Bytea,
        correlation_id -> Nullable<Text>,
        causation_id -> Nullable<Uuid>,
        traceparent -> Nullable<Text>,
        tracestate -> Nullable<Text>,
        created_at -> Timestamptz,
        stored_at -> Timestamptz,
    }
}

diesel::table! {
    inbox (consumer, event_id) {
        consumer -> Text,
        event_id -> Uuid,
        received_at -> Timestamptz,
    }
}
