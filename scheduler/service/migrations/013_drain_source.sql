-- The source and time of the latest start or end of each node's drain, beside the existing
-- flag and reason. A new leader keeps a drain that the node's agent requested, and an operator
-- can tell it from their own. Rows written before this migration contain operators' drains only,
-- because agents' drains were not stored. For the agent's requests and withdrawals, drain_at
-- is the agent's clock, because the agent withdraws only a drain it requested earlier.

ALTER TABLE scheduler.nodes ADD COLUMN drain_source text NOT NULL DEFAULT ''
    CHECK (drain_source IN ('', 'agent', 'operator'));

ALTER TABLE scheduler.nodes ADD COLUMN drain_at timestamptz;

UPDATE scheduler.nodes SET drain_source = 'operator' WHERE draining OR drain_reason <> '';

ALTER TABLE scheduler.nodes ADD CONSTRAINT nodes_drain_has_source
    CHECK (NOT draining OR drain_source <> '');
