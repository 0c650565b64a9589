-- ListSubAllocations looks up the sub-allocations of one holder across grants, e.g. the
-- scheduler finding the one that a sub-project's job draws on when the job names none.
CREATE INDEX allocations_holder ON allocations (holder);
