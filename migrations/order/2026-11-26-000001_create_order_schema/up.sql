-- Users the order service learned from `user.created`; PlaceOrder refuses
-- anyone else.
CREATE TABLE known_users (
    user_id UUID PRIMARY KEY,
    learned_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE orders (
    order_id UUID PRIMARY KEY,
    user_id UUID NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('PENDING', 'CONFIRMED', 'CANCELLED')),
    total_cents BIGINT NOT NULL DEFAULT 0 CHECK (total_cents >= 0),
    cancel_reason TEXT NOT NULL DEFAULT '',
    -- NULL when the client sent none: such orders are never deduplicated.
    idempotency_key TEXT,
    deadline TIMESTAMPTZ NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (user_id, idempotency_key)
);

-- ListOrders: a user's orders, newest first.
CREATE INDEX orders_by_user ON orders (user_id, created_at DESC, order_id);
-- The deadline sweeper looks only at orders still running.
CREATE INDEX pending_orders_by_deadline ON orders (deadline) WHERE status = 'PENDING';

CREATE TABLE order_items (
    order_id UUID NOT NULL REFERENCES orders (order_id),
    sku TEXT NOT NULL,
    quantity INTEGER NOT NULL CHECK (quantity BETWEEN 1 AND 1000),
    PRIMARY KEY (order_id, sku)
);

-- The saga's history as the order service saw it, shown by GetOrder.
CREATE TABLE order_steps (
    step_id BIGSERIAL PRIMARY KEY,
    order_id UUID NOT NULL REFERENCES orders (order_id),
    name TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    occurred_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX order_steps_by_order ON order_steps (order_id, step_id);
