-- One wallet per user, opened on `user.created`. A balance can never go
-- negative, whatever the handlers do.
CREATE TABLE accounts (
    user_id UUID PRIMARY KEY,
    balance_cents BIGINT NOT NULL CHECK (balance_cents >= 0),
    opened_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per order the payment service has seen. CANCELLED is a tombstone:
-- the order was cancelled before any capture, so a late `inventory.reserved`
-- must not debit the wallet.
CREATE TABLE payments (
    order_id UUID PRIMARY KEY,
    user_id UUID NOT NULL,
    amount_cents BIGINT NOT NULL CHECK (amount_cents >= 0),
    status TEXT NOT NULL CHECK (status IN ('CAPTURED', 'DECLINED', 'REFUNDED', 'CANCELLED')),
    reason TEXT NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Deposits, so that a retried Deposit with the same key credits once.
CREATE TABLE deposits (
    deposit_id UUID PRIMARY KEY,
    user_id UUID NOT NULL REFERENCES accounts (user_id),
    amount_cents BIGINT NOT NULL CHECK (amount_cents > 0),
    idempotency_key TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (user_id, idempotency_key)
);
