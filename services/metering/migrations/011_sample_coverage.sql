-- The latest end of the stored samples of each task, accelerator, node and provider, in
-- microseconds since the epoch. A new sample that starts at or after it cannot overlap a stored
-- sample of its key, so ingest probes usage_samples only for the few that start earlier.
CREATE TABLE metering.sample_coverage (
    provider text COLLATE "C" NOT NULL,
    node text COLLATE "C" NOT NULL,
    accelerator_id text COLLATE "C" NOT NULL,
    task_id text COLLATE "C" NOT NULL,
    end_us bigint NOT NULL,
    PRIMARY KEY (provider, node, accelerator_id, task_id)
);

INSERT INTO metering.sample_coverage (provider, node, accelerator_id, task_id, end_us)
SELECT provider, node, accelerator_id, task_id,
       (extract(epoch FROM max(end_time)) * 1000000)::bigint
FROM metering.usage_samples
GROUP BY provider, node, accelerator_id, task_id;
