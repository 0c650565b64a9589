-- When the scheduler stored each pledge, copied by PledgeSync. A settlement counts a pledge's
-- hours, and judges whether it was kept, from the later of this and the window's start.
-- Rows copied before this column get the time of this migration, which is no earlier than
-- their creation, and the next sync lowers it to the scheduler's value.
ALTER TABLE metering.pledges ADD COLUMN created_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE metering.pledges ALTER COLUMN created_at DROP DEFAULT;
