-- Nodes deleted with DeleteNode, one row per deletion: who deleted the node, when and why, as
-- its row in scheduler.nodes is gone. node_message is the serialized acsp.v1.Node that
-- DeleteNode returned, so a call retried with the same request_id returns the same node.
-- request_id is NULL for a call that sent none.

CREATE TABLE scheduler.node_deletions (
    deletion_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id text UNIQUE,
    provider text NOT NULL,
    region text NOT NULL,
    node text NOT NULL,
    reason text NOT NULL DEFAULT '',
    deleted_by text NOT NULL DEFAULT '',
    node_message bytea NOT NULL,
    deleted_at timestamptz NOT NULL DEFAULT now()
);
