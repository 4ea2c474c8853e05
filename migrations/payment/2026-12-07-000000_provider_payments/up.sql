-- Payments through an external provider. The step records its intent
-- (PENDING) and commits before it calls the provider; the outcome, from the
-- call's answer or from a webhook, whichever comes first, moves the row on.
-- A cancellation that finds a capture makes it REFUNDING until the
-- provider has refunded it.
ALTER TABLE payments DROP CONSTRAINT payments_status_check;
ALTER TABLE payments ADD CONSTRAINT payments_status_check CHECK (
    status IN ('CAPTURED', 'DECLINED', 'REFUNDED', 'CANCELLED', 'PENDING', 'REFUNDING'));
ALTER TABLE payments
    -- The provider's id of the charge, once known.
    ADD COLUMN provider_payment_id TEXT,
    -- The order was cancelled while the charge was PENDING: refund it if
    -- it succeeds.
    ADD COLUMN cancel_requested BOOLEAN NOT NULL DEFAULT false,
    -- Calls made for the current state, and when the next one is due.
    ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN next_attempt_at TIMESTAMPTZ;

-- What the provider's worker looks for.
CREATE INDEX payments_due ON payments (next_attempt_at)
    WHERE status IN ('PENDING', 'REFUNDING');

-- Webhook events applied, so that a duplicate applies nothing.
CREATE TABLE provider_webhooks (
    event_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
