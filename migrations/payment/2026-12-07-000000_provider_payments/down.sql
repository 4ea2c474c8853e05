DROP TABLE provider_webhooks;
DROP INDEX payments_due;
DELETE FROM payments WHERE status IN ('PENDING', 'REFUNDING');
ALTER TABLE payments
    DROP COLUMN provider_payment_id,
    DROP COLUMN cancel_requested,
    DROP COLUMN attempts,
    DROP COLUMN next_attempt_at;
ALTER TABLE payments DROP CONSTRAINT payments_status_check;
ALTER TABLE payments ADD CONSTRAINT payments_status_check CHECK (
    status IN ('CAPTURED', 'DECLINED', 'REFUNDED', 'CANCELLED'));
