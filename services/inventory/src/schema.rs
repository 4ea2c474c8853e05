//! The diesel view of `migrations/inventory/`.

diesel::table! {
    products (sku) {
        sku -> Text,
        name -> Text,
        price_cents -> Int8,
        available -> Int8,
        reserved -> Int8,
        sold -> Int8,
        stocked -> Int8,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    reservations (order_id) {
        order_id -> Uuid,
        user_id -> Uuid,
        status -> Text,
        total_cents -> Int8,
        reason -> Text,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    reservation_lines (order_id, sku) {
        order_id -> Uuid,
        sku -> Text,
        quantity -> Int8,
        unit_price_cents -> Int8,
    }
}

diesel::joinable!(reservation_lines -> reservations (order_id));
diesel::allow_tables_to_appear_in_same_query!(products, reservations, reservation_lines);
