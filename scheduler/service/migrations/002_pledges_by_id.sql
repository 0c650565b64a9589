-- Pledges get their own ids (a provider may pledge one pool in several windows), and recalls
-- are kept as rows of their own.

DROP TABLE scheduler.pledges;

CREATE TABLE scheduler.pledges (
    pledge_id text PRIMARY KEY,
    provider text NOT NULL,
    region text NOT NULL,
    model text NOT NULL,
    protected_count integer NOT NULL CHECK (protected_count >= 0),
    recallable_count integer NOT NULL CHECK (recallable_count >= 0),
    starts_at timestamptz NOT NULL,
    ends_at timestamptz NOT NULL,
    cause text NOT NULL DEFAULT '',
    updated_at timestamptz NOT NULL DEFAULT now(),
    CHECK (ends_at > starts_at)
);

CREATE INDEX pledges_provider ON scheduler.pledges (provider, pledge_id);

CREATE TABLE scheduler.recalls (
    recall_id text PRIMARY KEY,
    pledge_id text NOT NULL REFERENCES scheduler.pledges (pledge_id),
    count integer NOT NULL CHECK (count > 0),
    effective_at timestamptz NOT NULL,
    ends_at timestamptz,
    reason text NOT NULL DEFAULT '',
    request_id text UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK (ends_at IS NULL OR ends_at > effective_at)
);
