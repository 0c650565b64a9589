-- The provider registry: providers, their regions with a jurisdiction each, and the
-- RegisterProvider requests by idempotency key.

CREATE TABLE scheduler.providers (
    provider_id text PRIMARY KEY,
    display_name text NOT NULL,
    allow_cross_provider_gangs boolean NOT NULL DEFAULT false,
    -- True while the provider exists only because a node's inventory (or an older stored
    -- node or pledge) named it; a RegisterProvider call clears it.
    auto_registered boolean NOT NULL DEFAULT false,
    -- What caused the last change: the RPC and its request id, or the node whose inventory
    -- named the provider.
    cause text NOT NULL DEFAULT '',
    updated_by text NOT NULL DEFAULT '',
    -- Bumped by every registration, so a leader applying two of them in the wrong order
    -- keeps the newer.
    revision bigint NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE scheduler.regions (
    provider_id text NOT NULL REFERENCES scheduler.providers (provider_id),
    region_id text NOT NULL,
    display_name text NOT NULL,
    -- Empty when none is declared: no jurisdiction constraint matches such a region.
    jurisdiction text NOT NULL DEFAULT '',
    auto_registered boolean NOT NULL DEFAULT false,
    cause text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider_id, region_id)
);

CREATE INDEX regions_jurisdiction ON scheduler.regions (jurisdiction) WHERE jurisdiction <> '';

-- One row per RegisterProvider request id: the digest detects a key reused for another
-- registration, and a retry returns the provider as the first call left it.
CREATE TABLE scheduler.provider_requests (
    request_id text PRIMARY KEY,
    provider_id text NOT NULL,
    digest text NOT NULL,
    response jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Providers and regions that stored nodes and pledges already name.
INSERT INTO scheduler.providers (provider_id, display_name, auto_registered, cause)
SELECT DISTINCT provider, provider, true, 'named by stored nodes or pledges before the registry'
FROM (
    SELECT provider FROM scheduler.nodes
    UNION SELECT provider FROM scheduler.pledges
) AS named;

INSERT INTO scheduler.regions (provider_id, region_id, display_name, auto_registered, cause)
SELECT DISTINCT provider, region, region, true, 'named by stored nodes or pledges before the registry'
FROM (
    SELECT provider, region FROM scheduler.nodes
    UNION SELECT provider, region FROM scheduler.pledges
) AS named;
