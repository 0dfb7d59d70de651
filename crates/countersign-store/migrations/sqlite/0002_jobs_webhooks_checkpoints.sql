-- Jobs, webhooks and their deliveries, signed audit checkpoints, and audit retention.

CREATE TABLE jobs (
    id            TEXT PRIMARY KEY,
    org_id        TEXT NOT NULL REFERENCES orgs(id),
    kind          TEXT NOT NULL,
    subject       TEXT,
    state         TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    attempts      INTEGER NOT NULL,
    max_attempts  INTEGER NOT NULL,
    run_at        INTEGER NOT NULL,
    lease_owner   TEXT,
    lease_until   INTEGER,
    payload       TEXT NOT NULL,
    progress      TEXT,
    result        TEXT,
    error         TEXT,
    created_at    INTEGER NOT NULL,
    started_at    INTEGER,
    finished_at   INTEGER
);
CREATE INDEX jobs_org ON jobs (org_id, id);
CREATE INDEX jobs_subject ON jobs (org_id, subject);
CREATE INDEX jobs_due ON jobs (run_at) WHERE state = 'queued';
CREATE INDEX jobs_leased ON jobs (lease_until) WHERE state = 'running';

ALTER TABLE actions ADD COLUMN job_id TEXT;

CREATE TABLE webhooks (
    id           TEXT PRIMARY KEY,
    org_id       TEXT NOT NULL REFERENCES orgs(id),
    url          TEXT NOT NULL,
    events       TEXT NOT NULL,
    secret       TEXT NOT NULL,
    format       TEXT NOT NULL CHECK (format IN ('json', 'slack')),
    description  TEXT,
    created_at   INTEGER NOT NULL,
    deleted_at   INTEGER
);
CREATE INDEX webhooks_org ON webhooks (org_id, id);

CREATE TABLE webhook_deliveries (
    id          TEXT PRIMARY KEY,
    org_id      TEXT NOT NULL REFERENCES orgs(id),
    webhook_id  TEXT NOT NULL REFERENCES webhooks(id),
    job_id      TEXT NOT NULL REFERENCES jobs(id),
    event_id    TEXT NOT NULL,
    event_type  TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    status      INTEGER,
    latency_ms  INTEGER NOT NULL,
    error       TEXT,
    created_at  INTEGER NOT NULL
);
CREATE INDEX webhook_deliveries_webhook ON webhook_deliveries (org_id, webhook_id, id);

CREATE TABLE audit_checkpoints (
    org_id     TEXT NOT NULL REFERENCES orgs(id),
    seq        INTEGER NOT NULL,
    head_hash  TEXT NOT NULL,
    time_us    INTEGER NOT NULL,
    key_id     TEXT NOT NULL,
    signature  TEXT NOT NULL,
    PRIMARY KEY (org_id, seq)
) WITHOUT ROWID;

-- Per org: the retention window, and how far retention has deleted. The delete trigger below lets
-- retention remove a prefix up to `deleted_upto` and nothing else; a signed checkpoint at that seq keeps
-- the rest of the chain verifiable.
CREATE TABLE audit_retention (
    org_id        TEXT PRIMARY KEY REFERENCES orgs(id),
    days          INTEGER,
    deleted_upto  INTEGER NOT NULL DEFAULT 0
);

DROP TRIGGER audit_events_no_delete;
CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
WHEN NOT EXISTS (
    SELECT 1 FROM audit_retention r
    WHERE r.org_id = OLD.org_id AND OLD.seq <= r.deleted_upto
      AND EXISTS (SELECT 1 FROM audit_checkpoints c WHERE c.org_id = OLD.org_id AND c.seq = r.deleted_upto)
)
BEGIN
    SELECT RAISE(ABORT, 'audit events are append-only');
END;
CREATE TRIGGER audit_retention_forward BEFORE UPDATE ON audit_retention
WHEN NEW.deleted_upto < OLD.deleted_upto
BEGIN
    SELECT RAISE(ABORT, 'audit retention only moves forward');
END;
CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit checkpoints are append-only');
END;
CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit checkpoints are append-only');
END;
