-- Acknowledged commands and job events are kept only for a retention window
-- (ACSP_SCHEDULER_OUTBOX_RETENTION_S). These indexes let the leader find the rows acked before
-- the cutoff without scanning either table.

CREATE INDEX dispatches_acked ON scheduler.dispatches (acked_at) WHERE acked_at IS NOT NULL;

CREATE INDEX outbox_acked ON scheduler.outbox (shard, acked_at) WHERE acked_at IS NOT NULL;
