-- The job whose priority preemption stops each job's current attempt, so that a new leader
-- makes that job wait for the stop again. Empty while no priority preemption stops the job.
-- NULL in rows stored before this column: their stop reason names the preempting job instead,
-- so a leader upgraded while jobs stop still finds it. Rows inserted later default to empty.
ALTER TABLE scheduler.jobs ADD COLUMN preemptor_id text;
ALTER TABLE scheduler.jobs ALTER COLUMN preemptor_id SET DEFAULT '';
