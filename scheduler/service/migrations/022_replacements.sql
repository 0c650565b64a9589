-- The number of tasks replaced in place since the job was submitted. Each replacement's
-- commands end in it (`start:<node key>:<n>`, `stop:<node key>:<n>`, `hosts:<task index>:<n>`),
-- so a task that returns to a node it left gets a start of its own there, and agents order a
-- task's hosts files by it.
ALTER TABLE scheduler.jobs ADD COLUMN replacements integer NOT NULL DEFAULT 0;
