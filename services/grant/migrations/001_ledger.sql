-- Institutions, projects, applications, grants, sub-allocations and the ledger.
-- Amounts are PF-days as NUMERIC(48,24): 24 integer digits and the 1e-24 quantum.

CREATE TABLE institutions (
    id            text PRIMARY KEY,
    name          text NOT NULL,
    country_code  text NOT NULL DEFAULT '',
    created_by    text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE projects (
    id                 text PRIMARY KEY,
    institution_id     text NOT NULL REFERENCES institutions (id),
    name               text NOT NULL,
    pi                 text NOT NULL,
    created_by         text NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE project_members (
    project_id  text NOT NULL REFERENCES projects (id),
    member      text NOT NULL,
    role        text NOT NULL CHECK (role IN ('pi', 'member', 'viewer')),
    added_by    text NOT NULL,
    added_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, member)
);
CREATE INDEX project_members_member ON project_members (member);

CREATE TABLE applications (
    id                  text PRIMARY KEY,
    request_id          text NOT NULL UNIQUE,
    project_id          text NOT NULL REFERENCES projects (id),
    tier                text NOT NULL CHECK (tier IN ('exploratory', 'standard', 'flagship')),
    requested           numeric(48, 24) NOT NULL CHECK (requested > 0),
    starts_at           timestamptz NOT NULL,
    ends_at             timestamptz NOT NULL CHECK (ends_at > starts_at),
    accelerator_models  text[] NOT NULL DEFAULT '{}',
    regions             text[] NOT NULL DEFAULT '{}',
    providers           text[] NOT NULL DEFAULT '{}',
    justification       text NOT NULL,
    state               text NOT NULL
                        CHECK (state IN ('submitted', 'in_review', 'awarded', 'rejected',
                                         'withdrawn')),
    submitted_by        text NOT NULL,
    submitted_at        timestamptz NOT NULL DEFAULT now(),
    decision            text CHECK (decision IN ('award', 'award_less', 'reject')),
    decision_request_id text,
    awarded             numeric(48, 24),
    decision_reason     text,
    decided_by          text,
    decided_at          timestamptz,
    grant_id            text
);
CREATE INDEX applications_project ON applications (project_id);

CREATE TABLE application_reviewers (
    application_id  text NOT NULL REFERENCES applications (id),
    reviewer        text NOT NULL,
    institution_id  text NOT NULL,
    assigned_by     text NOT NULL,
    assigned_at     timestamptz NOT NULL DEFAULT now(),
    score           integer,
    comment         text,
    reviewed_at     timestamptz,
    PRIMARY KEY (application_id, reviewer)
);

-- Every step of an application: who did what, when, and why.
CREATE TABLE application_events (
    id              bigserial PRIMARY KEY,
    application_id  text NOT NULL REFERENCES applications (id),
    action          text NOT NULL,
    actor           text NOT NULL,
    detail          text NOT NULL DEFAULT '',
    at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX application_events_application ON application_events (application_id, id);

-- Each grant and each sub-allocation mirrors its own three ledger accounts (available, held,
-- consumed); credited = available + held + consumed + what was transferred to children or
-- returned to the program pool.
CREATE TABLE grants (
    id                  text PRIMARY KEY,
    project_id          text NOT NULL REFERENCES projects (id),
    application_id      text REFERENCES applications (id),
    tier                text NOT NULL CHECK (tier IN ('exploratory', 'standard', 'flagship')),
    starts_at           timestamptz NOT NULL,
    ends_at             timestamptz NOT NULL CHECK (ends_at > starts_at),
    providers           text[] NOT NULL DEFAULT '{}',
    regions             text[] NOT NULL DEFAULT '{}',
    accelerator_models  text[] NOT NULL DEFAULT '{}',
    rate_policy         text NOT NULL CHECK (rate_policy IN ('current', 'fixed_at_award')),
    rate_card_version   bigint,
    credited            numeric(48, 24) NOT NULL DEFAULT 0 CHECK (credited >= 0),
    available           numeric(48, 24) NOT NULL DEFAULT 0 CHECK (available >= 0),
    held                numeric(48, 24) NOT NULL DEFAULT 0 CHECK (held >= 0),
    consumed            numeric(48, 24) NOT NULL DEFAULT 0 CHECK (consumed >= 0),
    refunded            numeric(48, 24) NOT NULL DEFAULT 0 CHECK (refunded >= 0),
    supplemented        boolean NOT NULL DEFAULT false,
    expired             boolean NOT NULL DEFAULT false,
    low_notified        boolean NOT NULL DEFAULT false,
    expiring_notified   boolean NOT NULL DEFAULT false,
    created_by          text NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX grants_project ON grants (project_id, ends_at);
CREATE INDEX grants_open_by_end ON grants (ends_at) WHERE NOT expired;

-- A sub-allocation is funded by a transfer from its parent (the grant when parent_id is null).
CREATE TABLE allocations (
    id          text PRIMARY KEY,
    grant_id    text NOT NULL REFERENCES grants (id),
    parent_id   text REFERENCES allocations (id),
    holder      text NOT NULL,
    credited    numeric(48, 24) NOT NULL DEFAULT 0 CHECK (credited >= 0),
    available   numeric(48, 24) NOT NULL DEFAULT 0 CHECK (available >= 0),
    held        numeric(48, 24) NOT NULL DEFAULT 0 CHECK (held >= 0),
    consumed    numeric(48, 24) NOT NULL DEFAULT 0 CHECK (consumed >= 0),
    refunded    numeric(48, 24) NOT NULL DEFAULT 0 CHECK (refunded >= 0),
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX allocations_grant ON allocations (grant_id);

CREATE TABLE holds (
    id             text PRIMARY KEY,
    grant_id       text NOT NULL REFERENCES grants (id),
    allocation_id  text REFERENCES allocations (id),
    job_id         text NOT NULL,
    amount         numeric(48, 24) NOT NULL CHECK (amount > 0),
    remaining      numeric(48, 24) NOT NULL CHECK (remaining >= 0 AND remaining <= amount),
    charged        numeric(48, 24) NOT NULL DEFAULT 0 CHECK (charged >= 0),
    refunded       numeric(48, 24) NOT NULL DEFAULT 0 CHECK (refunded >= 0 AND refunded <= charged),
    released       numeric(48, 24) NOT NULL DEFAULT 0 CHECK (released >= 0),
    settled        boolean NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX holds_grant ON holds (grant_id);

-- The ledger: one row per movement, append-only. The idempotency key makes a retried or
-- replayed request return the stored result instead of moving budget again.
CREATE TABLE ledger_entries (
    id               bigserial PRIMARY KEY,
    idempotency_key  text NOT NULL UNIQUE,
    request_digest   text NOT NULL,
    kind             text NOT NULL CHECK (kind IN ('award', 'supplement', 'hold', 'release',
                                                   'charge', 'refund', 'expiry', 'transfer')),
    grant_id         text NOT NULL REFERENCES grants (id),
    hold_id          text REFERENCES holds (id),
    allocation_id    text REFERENCES allocations (id),
    amount           numeric(48, 24) NOT NULL CHECK (amount >= 0),
    job_id           text NOT NULL DEFAULT '',
    from_held        numeric(48, 24) NOT NULL DEFAULT 0,
    actor            text NOT NULL,
    trigger          text NOT NULL,
    reason           text NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_entries_grant ON ledger_entries (grant_id, id);
CREATE INDEX ledger_entries_hold ON ledger_entries (hold_id) WHERE hold_id IS NOT NULL;

CREATE TABLE postings (
    entry_id  bigint NOT NULL REFERENCES ledger_entries (id),
    account   text NOT NULL
              CHECK (account = 'program:pool'
                     OR account ~ '^(grant|sub_allocation):[^:]+:(available|held|consumed)$'),
    amount    numeric(48, 24) NOT NULL CHECK (amount <> 0)
);
CREATE INDEX postings_entry ON postings (entry_id);

CREATE FUNCTION reject_ledger_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only: % on % is not allowed', TG_OP, TG_TABLE_NAME;
END;
$$;
CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION reject_ledger_change();
CREATE TRIGGER postings_append_only BEFORE UPDATE OR DELETE ON postings
    FOR EACH ROW EXECUTE FUNCTION reject_ledger_change();

-- Events to publish on NATS, written in the same transaction as the change they report.
CREATE TABLE outbox (
    id            bigserial PRIMARY KEY,
    event_id      text NOT NULL,
    subject       text NOT NULL,
    payload       bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
