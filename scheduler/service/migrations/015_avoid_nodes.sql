-- The nodes that rejected a start of each job, as a JSON array of node keys. Later attempts of
-- the job go there only if no other node has room, also after a new leader loads the job.
ALTER TABLE scheduler.jobs ADD COLUMN avoid_nodes jsonb NOT NULL DEFAULT '[]';
