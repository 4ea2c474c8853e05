//! The diesel view of `migrations/payment/`.

diesel::table! {
    accounts (user_id) {
        user_id -> Uuid,
        balance_cents -> Int8,
        opened_at -> Timestamptz,
    }
}

diesel::table! {
    payments (order_id) {
        order_id -> Uuid,
        user_id -> Uuid,
        amount_cents -> Int8,
        status -> Text,
        reason -> Text,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        provider_payment_id -> Nullable<Text>,
        cancel_requested -> Bool,
        attempts -> Int4,
        next_attempt_at -> Nullable<Timestamptz>,
        traceparent -> Nullable<Text>,
    }
}

diesel::table! {
    provider_webhooks (event_id) {
        event_id -> Text,
        kind -> Text,
        received_at -> Timestamptz,
    }
}

diesel::table! {
    deposits (deposit_id) {
        deposit_id -> Uuid,
        user_id -> Uuid,
        amount_cents -> Int8,
        idempotency_key -> Nullable<Text>,
        created_at -> Timestamptz,
    }
}
