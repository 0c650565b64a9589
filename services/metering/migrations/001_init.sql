-- Metering schema: usage samples, per-period aggregates, charges, refunds, dead letters,
-- rate-card versions and the job, node, health and pledge facts that charging reads.

CREATE SCHEMA IF NOT EXISTS metering;

-- Every rate-card version ever published; the highest version is the current one.
CREATE TABLE metering.rate_cards (
    version integer PRIMARY KEY CHECK (version >= 1),
    effective_from timestamptz NOT NULL,
    body jsonb NOT NULL,
    cause text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Which provider and region each node belongs to. A usage sample whose subject names another
-- provider than the node's is rejected to dead letter.
CREATE TABLE metering.nodes (
    node text PRIMARY KEY,
    provider text NOT NULL,
    region text NOT NULL,
    cause text NOT NULL DEFAULT '',
    registered_at timestamptz NOT NULL DEFAULT now()
);

-- The facts about one attempt of a job that charging needs: whose budget, which hold, how it
-- ended. Each attempt has its own hold, so charges, settlement and refunds go by attempt.
CREATE TABLE metering.jobs (
    job_id text NOT NULL,
    attempt integer NOT NULL,
    hold_id text NOT NULL,
    grant_id text NOT NULL,
    project_id text NOT NULL DEFAULT '',
    institution_id text NOT NULL DEFAULT '',
    rate_policy text NOT NULL DEFAULT 'current'
        CHECK (rate_policy IN ('current', 'fixed_at_award')),
    award_rate_card_version integer,
    started_at timestamptz,
    ended_at timestamptz,
    -- completed, failed, cancelled, recalled, preempted
    end_reason text NOT NULL DEFAULT '',
    -- The recall or health event that ended the attempt, if any.
    end_trigger text NOT NULL DEFAULT '',
    last_checkpoint_at timestamptz,
    settled_at timestamptz,
    refund_checked_at timestamptz,
    cause text NOT NULL DEFAULT '',
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, attempt)
);

CREATE INDEX jobs_unsettled ON metering.jobs (ended_at) WHERE settled_at IS NULL;
CREATE INDEX jobs_refund_due ON metering.jobs (settled_at)
    WHERE settled_at IS NOT NULL AND refund_checked_at IS NULL;

-- One row per usage sample. The primary key on the agent's sample id is what makes ingest
-- exactly-once: a replay hours later hits it and changes nothing.
-- Key columns use the "C" collation: byte order is all a key needs, and it makes the index
-- inserts of a 50,000-samples-a-second ingest several times cheaper than a locale's order.
CREATE TABLE metering.usage_samples (
    sample_id text COLLATE "C" PRIMARY KEY,
    job_id text COLLATE "C" NOT NULL,
    attempt integer NOT NULL,
    task_id text NOT NULL,
    provider text NOT NULL,
    region text NOT NULL,
    node text NOT NULL,
    accelerator_id text NOT NULL,
    accelerator_model text NOT NULL,
    -- Thousandths of the accelerator, 1..1000.
    share_millis integer NOT NULL,
    start_time timestamptz NOT NULL,
    end_time timestamptz NOT NULL,
    -- Accelerator-microseconds (wall time x share), exact: the metering quantum is 1e-6
    -- accelerator-second. Integers keep ingest fast and sums exact.
    accelerator_micros bigint NOT NULL,
    -- NULL where the device could not report it.
    utilization real,
    period_start timestamptz NOT NULL,
    stream_sequence bigint NOT NULL,
    received_at timestamptz NOT NULL
);

CREATE INDEX usage_samples_job ON metering.usage_samples (job_id, attempt, start_time);

-- Metered accelerator-microseconds per attempt, charging period, location and model, updated
-- in the same transaction that inserts the samples. charged_micros trails accelerator_micros
-- until the charger turns the difference into a charge.
CREATE TABLE metering.usage_periods (
    job_id text COLLATE "C" NOT NULL,
    attempt integer NOT NULL,
    period_start timestamptz NOT NULL,
    provider text COLLATE "C" NOT NULL,
    region text COLLATE "C" NOT NULL,
    accelerator_model text COLLATE "C" NOT NULL,
    accelerator_micros bigint NOT NULL,
    charged_micros bigint NOT NULL DEFAULT 0,
    sample_count bigint NOT NULL,
    -- Sum of utilization x accelerator_seconds over samples that reported utilization, and
    -- their accelerator-seconds, for the time-weighted mean utilization.
    utilization_seconds double precision NOT NULL,
    utilization_weight double precision NOT NULL,
    PRIMARY KEY (job_id, attempt, period_start, provider, region, accelerator_model)
);

CREATE INDEX usage_periods_uncharged ON metering.usage_periods (period_start)
    WHERE accelerator_micros > charged_micros;
CREATE INDEX usage_periods_time ON metering.usage_periods (period_start, provider);

-- Samples and messages that failed validation, with the reason. dedupe_key is the sample id
-- when the sample had one, else the stream sequence and the sample's index in its report.
CREATE TABLE metering.dead_letters (
    dead_letter_id bigserial PRIMARY KEY,
    dedupe_key text NOT NULL UNIQUE,
    subject text NOT NULL,
    stream_sequence bigint NOT NULL,
    sample_id text,
    reason text NOT NULL,
    payload bytea,
    received_at timestamptz NOT NULL DEFAULT now()
);

-- One charge per job, period and sequence number. Sequence 0 is the period's charge; a sample
-- that arrives after its period was charged adds a charge with the next sequence number.
-- request_id is the ledger's idempotency key.
CREATE TABLE metering.charges (
    charge_id bigserial PRIMARY KEY,
    request_id text NOT NULL UNIQUE,
    job_id text NOT NULL,
    attempt integer NOT NULL,
    period_start timestamptz NOT NULL,
    seq integer NOT NULL,
    hold_id text NOT NULL,
    accelerator_seconds numeric(30, 6) NOT NULL,
    amount numeric(48, 24) NOT NULL CHECK (amount >= 0),
    rate_card_version integer NOT NULL,
    state text NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'committed', 'failed')),
    attempts integer NOT NULL DEFAULT 0,
    last_error text NOT NULL DEFAULT '',
    ledger_entry_id bigint,
    created_at timestamptz NOT NULL DEFAULT now(),
    committed_at timestamptz,
    -- true for the charges made when the attempt ended
    final boolean NOT NULL DEFAULT false,
    UNIQUE (job_id, attempt, period_start, seq)
);

CREATE INDEX charges_pending ON metering.charges (charge_id) WHERE state = 'pending';

-- The split of each charge by provider, region and model, which settlements add up.
CREATE TABLE metering.charge_lines (
    charge_id bigint NOT NULL REFERENCES metering.charges (charge_id),
    provider text NOT NULL,
    region text NOT NULL,
    accelerator_model text NOT NULL,
    accelerator_seconds numeric(30, 6) NOT NULL,
    amount numeric(48, 24) NOT NULL,
    period_start timestamptz NOT NULL,
    PRIMARY KEY (charge_id, provider, region, accelerator_model)
);

CREATE INDEX charge_lines_provider ON metering.charge_lines (provider, period_start);

-- Health events from agents; fatal ones can tie a job's failure to its accelerators.
CREATE TABLE metering.health_events (
    event_id text PRIMARY KEY,
    provider text NOT NULL,
    region text NOT NULL,
    node text NOT NULL,
    accelerator_id text NOT NULL,
    accelerator_model text NOT NULL DEFAULT '',
    kind text NOT NULL,
    code integer NOT NULL DEFAULT 0,
    fatal boolean NOT NULL,
    detail text NOT NULL DEFAULT '',
    event_time timestamptz NOT NULL
);

CREATE INDEX health_events_accelerator ON metering.health_events (accelerator_id, event_time);
CREATE INDEX health_events_node ON metering.health_events (node, event_time);

-- One refund per attempt at most; request_id is the ledger's idempotency key.
CREATE TABLE metering.refunds (
    job_id text NOT NULL,
    attempt integer NOT NULL,
    request_id text NOT NULL UNIQUE,
    hold_id text NOT NULL,
    amount numeric(48, 24) NOT NULL CHECK (amount > 0),
    accelerator_seconds numeric(30, 6) NOT NULL,
    lost_from timestamptz NOT NULL,
    lost_until timestamptz NOT NULL,
    reason text NOT NULL,
    cause text NOT NULL,
    state text NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'committed', 'failed')),
    attempts integer NOT NULL DEFAULT 0,
    last_error text NOT NULL DEFAULT '',
    ledger_entry_id bigint,
    created_at timestamptz NOT NULL DEFAULT now(),
    committed_at timestamptz,
    PRIMARY KEY (job_id, attempt)
);

CREATE INDEX refunds_pending ON metering.refunds (created_at) WHERE state = 'pending';

-- The split of each refund by provider, region and model, which reduces settlements.
CREATE TABLE metering.refund_lines (
    job_id text NOT NULL,
    attempt integer NOT NULL,
    provider text NOT NULL,
    region text NOT NULL,
    accelerator_model text NOT NULL,
    accelerator_seconds numeric(30, 6) NOT NULL,
    amount numeric(48, 24) NOT NULL,
    refund_time timestamptz NOT NULL,
    PRIMARY KEY (job_id, attempt, provider, region, accelerator_model),
    FOREIGN KEY (job_id, attempt) REFERENCES metering.refunds (job_id, attempt)
);

CREATE INDEX refund_lines_provider ON metering.refund_lines (provider, refund_time);

-- Pledged capacity and recalls, as the scheduler's fleet records them, for settlements.
CREATE TABLE metering.pledges (
    pledge_id text PRIMARY KEY,
    provider text NOT NULL,
    region text NOT NULL,
    accelerator_model text NOT NULL,
    protected_count integer NOT NULL CHECK (protected_count >= 0),
    recallable_count integer NOT NULL CHECK (recallable_count >= 0),
    window_start timestamptz NOT NULL,
    window_end timestamptz NOT NULL CHECK (window_end > window_start)
);

CREATE TABLE metering.recalls (
    recall_id text PRIMARY KEY,
    pledge_id text NOT NULL REFERENCES metering.pledges (pledge_id),
    accelerator_count integer NOT NULL CHECK (accelerator_count > 0),
    start_time timestamptz NOT NULL,
    end_time timestamptz NOT NULL CHECK (end_time > start_time)
);

-- Jobs flagged for sustained low utilization, and when their project was told.
CREATE TABLE metering.waste_flags (
    job_id text NOT NULL,
    attempt integer NOT NULL,
    project_id text NOT NULL,
    window_start timestamptz NOT NULL,
    window_end timestamptz NOT NULL,
    mean_utilization real NOT NULL,
    threshold real NOT NULL,
    reported_at timestamptz,
    PRIMARY KEY (job_id, attempt)
);
