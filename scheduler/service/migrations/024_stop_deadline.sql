-- When the stop commands of a stopping job's current attempt require its tasks to have
-- stopped: a preemption's grace deadline, or the end of a cancel's or failure's grace. A new
-- leader gives a preempted job's deadline back to its engine, so that the room the stop frees
-- may backfill jobs that end before then. NULL while no stop is out, and in rows stored
-- before this column, whose deadline a new leader treats as unknown.
ALTER TABLE scheduler.jobs ADD COLUMN stop_deadline timestamptz;
