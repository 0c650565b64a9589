-- Accelerators taken out of placement by a fatal health event (or a failed state in a node's
-- first inventory), so a new leader keeps them out. A row is deleted when the agent reports
-- the condition cleared; inventories and heartbeats never delete it.

CREATE TABLE scheduler.failed_accelerators (
    provider text NOT NULL,
    region text NOT NULL,
    node text NOT NULL,
    accelerator_id text NOT NULL,
    -- The agent's health event id, or inventory:<node>/<boot id>/<accelerator>.
    event_id text NOT NULL,
    reason text NOT NULL DEFAULT '',
    failed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, region, node, accelerator_id)
);
