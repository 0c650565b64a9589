-- Let a job's updates before its end stay heap-only (HOT), so that they write no index entry.
-- PostgreSQL updates a row in place of new index entries only when no indexed column changes,
-- and the columns in a partial index's WHERE clause count as indexed. The open-jobs index was
-- partial on state, which changes at every step, so each update of a job added an entry to
-- every index that covers the job (five, six for a job of an array). Its predicate is now
-- ended_at, which is set once, when the job ends, and never cleared. HOT also needs free room
-- on the row's page, hence the fill factor.
-- Pages written before this migration keep their old fill.

ALTER TABLE scheduler.jobs SET (fillfactor = 50);

DROP INDEX scheduler.jobs_open;

CREATE INDEX jobs_open ON scheduler.jobs (shard, job_id) WHERE ended_at IS NULL;
