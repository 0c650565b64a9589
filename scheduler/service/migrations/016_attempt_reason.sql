-- Why each job's current attempt began: the reason its previous attempt ended, kept while the
-- new attempt starts and runs, when the job's reason column moves on. Empty on a first attempt.
ALTER TABLE scheduler.jobs ADD COLUMN attempt_reason text NOT NULL DEFAULT '';
