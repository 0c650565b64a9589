-- The notice and duration of a recall requested with relative times, as the request gave them.
-- The scheduler resolves them to effective_at and ends_at once, when it first accepts the
-- request, and a retry with the same request_id matches on these instead of on times counted
-- from the retry. NULL where the request gave an absolute time, and for rows stored before.
ALTER TABLE scheduler.recalls ADD COLUMN notice interval, ADD COLUMN duration interval;
