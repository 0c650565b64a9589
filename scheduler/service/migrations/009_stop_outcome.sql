-- What a stopping job becomes once its tasks have stopped: a terminal state, or `requeue` for
-- a preemption. A new leader that reloads a stopping job ends it the same way. Empty in every
-- other state, and in rows written before this column, which end as cancelled.

ALTER TABLE scheduler.jobs ADD COLUMN stop_outcome text NOT NULL DEFAULT '';
