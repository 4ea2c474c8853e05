-- The trace context of the step that recorded a provider's payment, so that
-- the events its outcome writes later (from the worker or a webhook) stay in
-- the saga's trace.
ALTER TABLE payments ADD COLUMN traceparent TEXT;
