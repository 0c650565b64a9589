-- The ExpireGrants request that expired grants, so that a retry of it returns the first result
-- instead of expiring what became due since, while the same request id with another as_of_time
-- is rejected. Each grant's expiry adds itself here in the transaction that expires it, so a
-- retry after a crash resumes with the stored cut-off and reports every grant the request
-- expired.
CREATE TABLE expiry_requests (
    request_key     text PRIMARY KEY,
    -- The as_of_time the caller sent, or NULL when the request left it unset.
    requested_as_of timestamptz,
    -- The cut-off the request used: requested_as_of, or the time of the first attempt.
    as_of           timestamptz NOT NULL,
    grant_ids       text[] NOT NULL DEFAULT '{}',
    returned        numeric(48, 24) NOT NULL DEFAULT 0 CHECK (returned >= 0),
    completed       boolean NOT NULL DEFAULT false,
    actor           text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
