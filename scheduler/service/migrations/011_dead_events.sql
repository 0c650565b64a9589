-- Job events that JetStream rejected for good, for example over the stream's max_msg_size or
-- on a subject that no stream captures. An outbox row counts its rejections, and once it
-- reaches ACSP_SCHEDULER_MAX_EVENT_REJECTIONS the leader moves it here in one transaction, so
-- it is not published again. Rows stay until an operator deletes them. To publish one by
-- hand, send its payload to its subject with its event_id as the Nats-Msg-Id header.

ALTER TABLE scheduler.outbox ADD COLUMN rejections integer NOT NULL DEFAULT 0;

CREATE TABLE scheduler.dead_events (
    event_id text PRIMARY KEY,
    shard text NOT NULL,
    subject text NOT NULL,
    payload bytea NOT NULL,
    -- The last rejection's reason, from JetStream or the NATS client.
    reason text NOT NULL,
    rejections integer NOT NULL,
    -- When the event was recorded in the outbox, and when it moved here.
    created_at timestamptz NOT NULL,
    dead_at timestamptz NOT NULL DEFAULT now()
);
