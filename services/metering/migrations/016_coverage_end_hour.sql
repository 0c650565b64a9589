-- Ingest finds the samples of other tasks that may overlap a new sample through their tasks'
-- coverage rows on its accelerator. Only a row that ends after the sample starts can lead to
-- such a sample, but the primary key made the probe read every row of the accelerator, one
-- per task that ever ran on it, so it grew slower as a node aged. This index lets the probe
-- read only the rows that end in the hour the sample starts or later.
-- The index holds the hour of end_us, not end_us itself. Each batch raises end_us, and a
-- raise that changes an indexed value is not a heap-only (HOT) update, so it writes an entry
-- in every index of the table. The hour of a row changes at most once an hour, so the other
-- raises can stay HOT updates. As a stored generated column, end_hour is end_us / 3600000000
-- in every row, also in rows that replicas older than this migration write.
-- The index leaves out the accelerators' own rows (the empty task id), so only the scan of
-- other tasks' rows, which repeats that condition, can use it, and a lookup of one task's row
-- always uses the primary key. Without the condition, the planner picked the smaller index for
-- such a lookup when the table had no statistics, and read every row of the accelerator.
ALTER TABLE metering.sample_coverage
    ADD COLUMN end_hour bigint GENERATED ALWAYS AS (end_us / 3600000000) STORED;
CREATE INDEX sample_coverage_end_hour ON metering.sample_coverage
    (provider, node, accelerator_id, end_hour)
    WHERE task_id <> '';
-- The planner picks this index over the primary key from the table's statistics.
ANALYZE metering.sample_coverage;
