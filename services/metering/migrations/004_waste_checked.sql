-- When the background waste scan evaluated an ended attempt. An attempt with waste_checked_at
-- empty is still due, so any replica can pick it up; the scan sets it in the transaction that
-- stores the attempt's waste flag, if any.

ALTER TABLE metering.jobs ADD COLUMN waste_checked_at timestamptz;

CREATE INDEX jobs_waste_unchecked ON metering.jobs (ended_at)
    WHERE ended_at IS NOT NULL AND waste_checked_at IS NULL;
