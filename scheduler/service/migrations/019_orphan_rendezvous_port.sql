-- The rendezvous port reserved for a task 0 copy that waits for a confirmed stop, so that a new
-- leader hands that port to no other job until the copy stopped. 0 for the copies of other tasks,
-- copies whose port was not reserved, and rows stored before this column.
ALTER TABLE scheduler.orphans ADD COLUMN rendezvous_port int NOT NULL DEFAULT 0;
