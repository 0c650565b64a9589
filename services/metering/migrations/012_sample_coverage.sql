-- Per task, accelerator, node and provider, an end in microseconds since the epoch that no
-- stored sample ends after. A new sample that starts at or after it cannot overlap a stored
-- sample of its key, so ingest probes usage_samples only for the few that start earlier.
-- raised_by is the batch that raised end_us last, and prior_end the end before that raise, so
-- that batch compares its samples with the end before its own.
CREATE TABLE metering.sample_coverage (
    provider text COLLATE "C" NOT NULL,
    node text COLLATE "C" NOT NULL,
    accelerator_id text COLLATE "C" NOT NULL,
    task_id text COLLATE "C" NOT NULL,
    end_us bigint NOT NULL,
    prior_end bigint NOT NULL,
    raised_by bigint NOT NULL,
    PRIMARY KEY (provider, node, accelerator_id, task_id)
);

INSERT INTO metering.sample_coverage
    (provider, node, accelerator_id, task_id, end_us, prior_end, raised_by)
SELECT provider, node, accelerator_id, task_id,
       (extract(epoch FROM max(end_time)) * 1000000)::bigint,
       (extract(epoch FROM max(end_time)) * 1000000)::bigint, 0
FROM metering.usage_samples
GROUP BY provider, node, accelerator_id, task_id;
