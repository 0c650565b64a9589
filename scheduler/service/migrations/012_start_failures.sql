-- Attempts in a row of a job that a node rejected at start, so a new leader fails the job
-- after the same number of failed starts as the leader before it. Reset to 0 once every task
-- of an attempt starts.

ALTER TABLE scheduler.jobs ADD COLUMN start_failures integer NOT NULL DEFAULT 0
    CHECK (start_failures >= 0);
