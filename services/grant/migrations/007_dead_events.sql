-- Grant events that JetStream rejected for good, for example over the stream's max_msg_size or
-- on a subject that no stream captures. An outbox row counts its rejections, at most one per
-- 5 s, and once it reaches ACSP_GRANT_MAX_EVENT_REJECTIONS the publisher moves it here in one
-- transaction, so it is not published again. The ledger is not touched. Rows stay until an
-- operator deletes them. To publish one by hand, send its payload to its subject with its
-- message_id as the Nats-Msg-Id header.

ALTER TABLE outbox ADD COLUMN rejections integer NOT NULL DEFAULT 0;
-- When JetStream last rejected the row's message; the row waits 5 s before it is tried again.
ALTER TABLE outbox ADD COLUMN rejected_at timestamptz;

CREATE TABLE dead_events (
    -- grant-outbox-<outbox id>, the Nats-Msg-Id the event was published with.
    message_id  text PRIMARY KEY,
    event_id    text NOT NULL,
    subject     text NOT NULL,
    payload     bytea NOT NULL,
    -- The last rejection's reason, from JetStream or the NATS client.
    reason      text NOT NULL,
    rejections  integer NOT NULL,
    -- When the event was written to the outbox, and when it moved here.
    created_at  timestamptz NOT NULL,
    dead_at     timestamptz NOT NULL DEFAULT now()
);
