-- When each pledge was stored, so that a settlement counts its hours from then on and never
-- before: a window may start before the pledge was made, and no one measured that time.
-- Rows stored before this column get the earliest time they are known to have existed: their
-- last change or their first recall, whichever is earlier. That may be later than their real
-- creation, so such a pledge counts fewer hours, never more.
ALTER TABLE scheduler.pledges ADD COLUMN created_at timestamptz;
UPDATE scheduler.pledges p SET created_at = least(
    p.updated_at,
    (SELECT min(r.created_at) FROM scheduler.recalls r WHERE r.pledge_id = p.pledge_id)
);
ALTER TABLE scheduler.pledges
    ALTER COLUMN created_at SET DEFAULT now(),
    ALTER COLUMN created_at SET NOT NULL;
