-- Changes to a grant that move no budget, or that the ledger records only as amounts:
-- who extended, supplemented or expired it, when, and why.
CREATE TABLE grant_changes (
    id          bigserial PRIMARY KEY,
    grant_id    text NOT NULL REFERENCES grants (id),
    action      text NOT NULL CHECK (action IN ('extended', 'supplemented', 'expired')),
    actor       text NOT NULL,
    detail      text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX grant_changes_grant ON grant_changes (grant_id, id);
