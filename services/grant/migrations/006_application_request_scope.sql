-- An application's request id is unique per submitter and project, not across all callers, so
-- a request id that another caller used creates an application instead of returning theirs.
-- Rows stored before this change keep their ids, which were unique across all callers.
ALTER TABLE applications DROP CONSTRAINT applications_request_id_key;
ALTER TABLE applications
    ADD CONSTRAINT applications_request_scope UNIQUE (submitted_by, project_id, request_id);
