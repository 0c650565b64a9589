-- The request that removed a member, so that a retry of it succeeds again instead of finding
-- no member, while the same request id for another removal is refused.
CREATE TABLE member_removals (
    request_id text PRIMARY KEY,
    project_id text NOT NULL REFERENCES projects (id),
    member text NOT NULL,
    removed_by text NOT NULL,
    removed_at timestamptz NOT NULL DEFAULT now()
);
