-- The request that extended a grant, so that a retry of it returns the grant instead of moving
-- its end again, while the same request id for another extension is rejected. Rows stored
-- before this change and the other actions have no request key.
ALTER TABLE grant_changes
    ADD COLUMN request_key text,
    ADD COLUMN new_end timestamptz;
CREATE UNIQUE INDEX grant_changes_request_key ON grant_changes (request_key)
    WHERE request_key IS NOT NULL;
