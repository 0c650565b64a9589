-- A task replaced on a new node gets a start there and a stop on the node it left. Their kinds
-- name that node (`start:<node key>`, `stop:<node key>`), so they keep their own primary key
-- next to the task's first start and last stop.

ALTER TABLE scheduler.dispatches DROP CONSTRAINT dispatches_kind_check;

ALTER TABLE scheduler.dispatches ADD CONSTRAINT dispatches_kind_check
    CHECK (kind IN ('start', 'stop') OR kind ~ '^(start|stop):.+$');
