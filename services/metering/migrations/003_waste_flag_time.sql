-- When each waste flag was raised, sent in its WasteFlagEvent. reported_at, already present,
-- marks when the event was published, so unreported flags form the event outbox.

ALTER TABLE metering.waste_flags ADD COLUMN flagged_at timestamptz NOT NULL DEFAULT now();

CREATE INDEX waste_flags_unreported ON metering.waste_flags (flagged_at)
    WHERE reported_at IS NULL;
