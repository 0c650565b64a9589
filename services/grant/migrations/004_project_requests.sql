-- The request that created a project, so that a retry of it returns the project while a
-- different request for the same id is refused.
ALTER TABLE projects ADD COLUMN request_id text;
