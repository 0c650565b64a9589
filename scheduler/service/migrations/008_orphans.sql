-- Task copies that got a stop command and that their node has not yet confirmed stopped: tasks
-- of ended attempts, and copies a replaced task left on the node it was lost with. A new leader
-- loads them and keeps their accelerators from other jobs until the node confirms the stop, as
-- the leader before it did.

CREATE TABLE scheduler.orphans (
    shard text NOT NULL,
    node_key text NOT NULL,
    task_id text NOT NULL,
    accelerators text[] NOT NULL,
    millis integer NOT NULL CHECK (millis >= 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (shard, node_key, task_id)
);
