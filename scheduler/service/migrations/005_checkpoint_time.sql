-- When the agent read the job's last reported checkpoint reference (checkpoint_ref), so job
-- events and the API can say how old the checkpoint a requeued attempt resumes from is. NULL
-- until a task of the job reports a checkpoint.

ALTER TABLE scheduler.jobs ADD COLUMN checkpoint_at timestamptz;
