-- When PledgeSync last copied pledges and recalls from the scheduler: per provider for the copy
-- a settlement makes of its provider's pledges, and under the empty provider for the periodic
-- copy of every provider's. A settlement reports the later of its provider's two rows, so a
-- reader can tell when the scheduler could not be read and the copy is older.
CREATE TABLE metering.pledge_copies (
    provider text PRIMARY KEY,
    copied_at timestamptz NOT NULL
);
