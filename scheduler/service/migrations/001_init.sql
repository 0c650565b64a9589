-- Scheduler schema: leader epochs, jobs, tasks, dispatch records, fleet and pledges.

CREATE TABLE scheduler.leaders (
    shard text PRIMARY KEY,
    epoch bigint NOT NULL,
    holder text NOT NULL,
    since timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE scheduler.jobs (
    job_id text PRIMARY KEY,
    shard text NOT NULL,
    owner text NOT NULL,
    institution text NOT NULL DEFAULT '',
    request_id text,
    grant_id text NOT NULL,
    spec jsonb NOT NULL,
    project_id text NOT NULL,
    state text NOT NULL CHECK (
        state IN ('pending', 'starting', 'running', 'stopping', 'completed', 'failed',
                  'cancelled', 'timed_out')
    ),
    pending_reason text NOT NULL DEFAULT '',
    reason text NOT NULL DEFAULT '',
    attempt integer NOT NULL DEFAULT 1,
    array_id text NOT NULL DEFAULT '',
    array_index integer NOT NULL DEFAULT 0,
    submitted_at timestamptz NOT NULL,
    started_at timestamptz,
    ended_at timestamptz,
    hold_id text NOT NULL DEFAULT '',
    hold_amount numeric(48, 24),
    checkpoint_ref text NOT NULL DEFAULT '',
    exit_code integer,
    placement jsonb NOT NULL DEFAULT '[]',
    -- What caused the last change (request id, event id, engine pass), and the leader epoch
    -- that wrote it.
    cause text NOT NULL DEFAULT '',
    epoch bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX jobs_open ON scheduler.jobs (shard, job_id)
    WHERE state IN ('pending', 'starting', 'running', 'stopping');
CREATE UNIQUE INDEX jobs_request ON scheduler.jobs (request_id);
CREATE INDEX jobs_project ON scheduler.jobs (project_id, job_id);
CREATE INDEX jobs_owner ON scheduler.jobs (owner, job_id);
CREATE INDEX jobs_array ON scheduler.jobs (array_id, array_index) WHERE array_id <> '';

-- One row per command sent to an agent. The primary key is the dedupe key: a command is
-- recorded before it is published, and a restarted leader republishes only unacked rows
-- under the same Nats-Msg-Id.
CREATE TABLE scheduler.dispatches (
    job_id text NOT NULL,
    attempt integer NOT NULL,
    task_index integer NOT NULL,
    kind text NOT NULL CHECK (kind IN ('start', 'stop')),
    node_key text NOT NULL,
    payload bytea NOT NULL,
    epoch bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    acked_at timestamptz,
    PRIMARY KEY (job_id, attempt, task_index, kind)
);

CREATE INDEX dispatches_unacked ON scheduler.dispatches (created_at) WHERE acked_at IS NULL;

-- Job events recorded with the change that caused them and published after the commit;
-- unacknowledged ones are published again under the same Nats-Msg-Id.
CREATE TABLE scheduler.outbox (
    event_id text PRIMARY KEY,
    shard text NOT NULL,
    subject text NOT NULL,
    payload bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    acked_at timestamptz
);

CREATE INDEX outbox_unacked ON scheduler.outbox (shard, created_at) WHERE acked_at IS NULL;

CREATE TABLE scheduler.nodes (
    provider text NOT NULL,
    region text NOT NULL,
    node text NOT NULL,
    draining boolean NOT NULL DEFAULT false,
    drain_reason text NOT NULL DEFAULT '',
    inventory bytea,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, region, node)
);

CREATE TABLE scheduler.pledges (
    provider text NOT NULL,
    region text NOT NULL,
    model text NOT NULL,
    protected_count integer NOT NULL CHECK (protected_count >= 0),
    recallable_count integer NOT NULL CHECK (recallable_count >= 0),
    starts_at timestamptz NOT NULL,
    ends_at timestamptz,
    recalled_count integer NOT NULL DEFAULT 0 CHECK (recalled_count >= 0),
    recall_effective_at timestamptz,
    cause text NOT NULL DEFAULT '',
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, region, model),
    CHECK (recalled_count <= recallable_count),
    CHECK (ends_at IS NULL OR ends_at > starts_at)
);
