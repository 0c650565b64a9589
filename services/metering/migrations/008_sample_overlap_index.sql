-- Ingest rejects a sample whose interval overlaps a stored sample of the same task, accelerator,
-- node and provider. This index finds, in one probe, the stored sample of that key that starts
-- last before a new sample ends. It replaces usage_samples_job, whose (job_id, attempt) prefix
-- it keeps for the queries by attempt, so ingest still updates two indexes per sample. The
-- columns take the "C" collation like the other key columns, because byte order is all a key
-- needs and it makes index inserts cheaper.
ALTER TABLE metering.usage_samples ALTER COLUMN task_id TYPE text COLLATE "C";
ALTER TABLE metering.usage_samples ALTER COLUMN node TYPE text COLLATE "C";
ALTER TABLE metering.usage_samples ALTER COLUMN accelerator_id TYPE text COLLATE "C";
DROP INDEX metering.usage_samples_job;
CREATE INDEX usage_samples_accelerator ON metering.usage_samples
    (job_id, attempt, task_id, accelerator_id, node, provider, start_time);
