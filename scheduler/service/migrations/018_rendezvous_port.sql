-- The rendezvous port of each job's current attempt, so that a new leader knows which ports of
-- a node its running jobs hold and hands none of them to another job. 0 until the attempt's
-- start commands go out.
ALTER TABLE scheduler.jobs ADD COLUMN rendezvous_port int NOT NULL DEFAULT 0;
