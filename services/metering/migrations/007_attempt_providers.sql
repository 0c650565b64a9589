-- The providers whose nodes ran an attempt's tasks, from the placements of its job events.
-- Usage that any other provider reports for the attempt is not charged, so a provider cannot
-- bill a grant for a job it does not run. NULL means no placement is known, as for attempts
-- recorded before this column existed; their usage is charged as before.
ALTER TABLE metering.jobs ADD COLUMN providers text[];
