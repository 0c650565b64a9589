-- Nodes an operator marked down (MarkNodeDown), with the operator's reason, so a new leader
-- keeps them down with nothing fenced on them instead of reloading them as up. The flag is
-- cleared when the node sends a heartbeat or an inventory again.

ALTER TABLE scheduler.nodes ADD COLUMN down boolean NOT NULL DEFAULT false;

ALTER TABLE scheduler.nodes ADD COLUMN down_reason text NOT NULL DEFAULT '';
