-- A task replaced on a new node makes the scheduler rewrite the hosts files of its gang's other
-- live tasks. Those commands have the kind `hosts:<replaced task index>:<microseconds>`, one
-- per replacement.

ALTER TABLE scheduler.dispatches DROP CONSTRAINT dispatches_kind_check;

ALTER TABLE scheduler.dispatches ADD CONSTRAINT dispatches_kind_check
    CHECK (kind IN ('start', 'stop') OR kind ~ '^(start|stop):.+$' OR kind ~ '^hosts:.+$');
