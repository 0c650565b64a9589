-- An ended attempt's hold is first released (its remainder returns to the grant, and late
-- usage may still be charged to it) and only settled, which closes it to charges, once no
-- more usage is expected. released_at marks the first step and starts the refund check;
-- settled_at now marks the second.

ALTER TABLE metering.jobs ADD COLUMN released_at timestamptz;

-- Attempts settled before this migration were released in the same step.
UPDATE metering.jobs SET released_at = settled_at WHERE settled_at IS NOT NULL;

DROP INDEX metering.jobs_unsettled;
DROP INDEX metering.jobs_refund_due;
CREATE INDEX jobs_unreleased ON metering.jobs (ended_at) WHERE released_at IS NULL;
CREATE INDEX jobs_released_unsettled ON metering.jobs (released_at)
    WHERE released_at IS NOT NULL AND settled_at IS NULL;
CREATE INDEX jobs_refund_due ON metering.jobs (released_at)
    WHERE released_at IS NOT NULL AND refund_checked_at IS NULL;
