//! The diesel view of `migrations/user/`.

diesel::table! {
    users (user_id) {
        user_id -> Uuid,
        email -> Text,
        email_key -> Text,
        name -> Text,
        created_at -> Timestamptz,
    }
}
