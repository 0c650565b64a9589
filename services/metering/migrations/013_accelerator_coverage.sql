-- Ingest also rejects a sample that overlaps a sample of another task on the same accelerator,
-- node and provider when either of the two holds the whole accelerator (share_millis 1000).
-- Each accelerator gets a coverage row of its own, with the empty task id, which no sample has:
-- end_us is the latest end of any task's samples on it, and exclusive_end the latest end of its
-- whole-accelerator samples. A sample that starts at or after end_us overlaps nothing stored on
-- its accelerator, and a fractional one that starts at or after exclusive_end overlaps no
-- whole-accelerator sample, so ingest probes other tasks only for the few that start earlier.
-- The rows sort before their accelerator's task rows, so the one upsert that raises both locks
-- them in a single key order. prior_exclusive_end is exclusive_end before the last raise, as
-- prior_end is for end_us. Task rows keep both columns at 0.
ALTER TABLE metering.sample_coverage
    ADD COLUMN exclusive_end bigint NOT NULL DEFAULT 0,
    ADD COLUMN prior_exclusive_end bigint NOT NULL DEFAULT 0;

INSERT INTO metering.sample_coverage
    (provider, node, accelerator_id, task_id, end_us, prior_end, raised_by, exclusive_end,
     prior_exclusive_end)
SELECT provider, node, accelerator_id, '', max(end_us), max(end_us), 0,
       coalesce(max(exclusive_end), 0), coalesce(max(exclusive_end), 0)
FROM (
    SELECT provider, node, accelerator_id,
           (extract(epoch FROM end_time) * 1000000)::bigint AS end_us,
           CASE WHEN share_millis = 1000
                THEN (extract(epoch FROM end_time) * 1000000)::bigint END AS exclusive_end
    FROM metering.usage_samples
) AS s
GROUP BY provider, node, accelerator_id;
