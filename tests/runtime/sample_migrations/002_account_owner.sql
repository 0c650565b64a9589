ALTER TABLE accounts ADD COLUMN owner text NOT NULL DEFAULT '';
CREATE TABLE migration_runs (applied_by text NOT NULL DEFAULT current_setting('application_name'));
INSERT INTO migration_runs DEFAULT VALUES;
