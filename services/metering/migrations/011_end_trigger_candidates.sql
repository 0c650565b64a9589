-- The first trigger that each provider named for an attempt whose providers were not known yet.
-- Only one of them is the attempt's end_trigger, and it is cleared when the placements show
-- that its provider runs none of the attempt's tasks. The earliest candidate of a placed
-- provider then takes its place, so a trigger from another provider cannot hide the placed
-- provider's trigger that came after it. Candidates are ordered by the time of the transaction
-- that recorded them, then by their position in its batch.
CREATE TABLE metering.end_trigger_candidates (
    job_id      text NOT NULL,
    attempt     integer NOT NULL,
    provider    text NOT NULL,
    end_trigger text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    position    bigint NOT NULL,
    PRIMARY KEY (job_id, attempt, provider)
);
