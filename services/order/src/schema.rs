//! The diesel view of `migrations/order/`.

diesel::table! {
    known_users (user_id) {
        user_id -> Uuid,
        learned_at -> Timestamptz,
    }
}

diesel::table! {
    orders (order_id) {
        order_id -> Uuid,
        user_id -> Uuid,
        status -> Text,
        total_cents -> Int8,
        cancel_reason -> Text,
        idempotency_key -> Nullable<Text>,
        deadline -> Timestamptz,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    order_items (order_id, sku) {
        order_id -> Uuid,
        sku -> Text,
        quantity -> Int4,
    }
}

diesel::table! {
    order_steps (step_id) {
        step_id -> Int8,
        order_id -> Uuid,
        name -> Text,
        detail -> Text,
        occurred_at -> Timestamptz,
    }
}
