-- The user service's customers. `email_key` is the lowercased address, so that
-- uniqueness ignores case while `email` keeps what the user typed.
CREATE TABLE users (
    user_id UUID PRIMARY KEY,
    email TEXT NOT NULL,
    email_key TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- ListUsers pages in registration order; user_id breaks ties.
CREATE INDEX users_by_registration ON users (created_at, user_id);
