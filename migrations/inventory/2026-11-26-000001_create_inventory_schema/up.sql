-- Where each product's units are. The checks make overselling impossible
-- even if a handler were wrong: a reservation that would take `available`
-- below zero fails its transaction.
CREATE TABLE products (
    sku TEXT PRIMARY KEY CHECK (char_length(sku) BETWEEN 1 AND 64),
    name TEXT NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    price_cents BIGINT NOT NULL CHECK (price_cents >= 0),
    available BIGINT NOT NULL CHECK (available >= 0),
    reserved BIGINT NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    sold BIGINT NOT NULL DEFAULT 0 CHECK (sold >= 0),
    -- Every unit ever put in: initial stock plus AddStock. The invariant
    -- available + reserved + sold = stocked holds after every transaction.
    stocked BIGINT NOT NULL CHECK (stocked >= 0),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (available + reserved + sold = stocked)
);

-- One row per order the inventory service has seen. The row outlives the
-- reservation as a tombstone: a cancellation that arrives before its
-- `order.placed` leaves a CANCELLED row, so the late order is refused.
CREATE TABLE reservations (
    order_id UUID PRIMARY KEY,
    user_id UUID NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('RESERVED', 'REJECTED', 'RELEASED', 'SOLD', 'CANCELLED')),
    total_cents BIGINT NOT NULL DEFAULT 0 CHECK (total_cents >= 0),
    reason TEXT NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE reservation_lines (
    order_id UUID NOT NULL REFERENCES reservations (order_id),
    sku TEXT NOT NULL REFERENCES products (sku),
    quantity BIGINT NOT NULL CHECK (quantity > 0),
    unit_price_cents BIGINT NOT NULL CHECK (unit_price_cents >= 0),
    PRIMARY KEY (order_id, sku)
);
