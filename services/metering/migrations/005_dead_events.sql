-- Waste flag events that JetStream rejected for good, for example over the stream's
-- max_msg_size or on a subject that no stream captures. A flag counts its rejections, at most
-- one per 5 s. Once it reaches ACSP_METERING_MAX_EVENT_REJECTIONS, the publisher sets the
-- flag's dead_at and copies its event here in one transaction, so it is not published again.
-- The flag itself stays, so the attempt is not flagged a second time. Rows here stay until an
-- operator deletes them. To publish one by hand, send its payload to its subject with its
-- message_id as the Nats-Msg-Id header.

ALTER TABLE metering.waste_flags ADD COLUMN rejections integer NOT NULL DEFAULT 0;
-- When JetStream last rejected the flag's event; the flag waits 5 s before it is tried again.
ALTER TABLE metering.waste_flags ADD COLUMN rejected_at timestamptz;
-- When the flag's event moved to metering.dead_events; such a flag is never published.
ALTER TABLE metering.waste_flags ADD COLUMN dead_at timestamptz;

DROP INDEX metering.waste_flags_unreported;
CREATE INDEX waste_flags_unreported ON metering.waste_flags (flagged_at)
    WHERE reported_at IS NULL AND dead_at IS NULL;

CREATE TABLE metering.dead_events (
    -- metering-waste/<job_id>/<attempt>, the Nats-Msg-Id the event was published with.
    message_id  text PRIMARY KEY,
    event_id    text NOT NULL,
    subject     text NOT NULL,
    payload     bytea NOT NULL,
    -- The last rejection's reason, from JetStream or the NATS client.
    reason      text NOT NULL,
    rejections  integer NOT NULL,
    -- When the flag was raised, and when its event moved here.
    created_at  timestamptz NOT NULL,
    dead_at     timestamptz NOT NULL DEFAULT now()
);
