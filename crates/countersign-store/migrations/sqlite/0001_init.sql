-- Countersign schema for SQLite. Times are microseconds since the Unix epoch (INTEGER); JSON is TEXT.
-- Every tenant table carries org_id, and every query filters on it.

CREATE TABLE orgs (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
);

CREATE TABLE users (
    id              TEXT PRIMARY KEY,
    org_id          TEXT NOT NULL REFERENCES orgs(id),
    name            TEXT NOT NULL,
    role            TEXT NOT NULL CHECK (role IN ('admin', 'approver', 'viewer')),
    instance_admin  INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL,
    disabled_at     INTEGER,
    UNIQUE (org_id, name)
);

CREATE TABLE agents (
    id              TEXT PRIMARY KEY,
    org_id          TEXT NOT NULL REFERENCES orgs(id),
    name            TEXT NOT NULL,
    owner_user_id   TEXT REFERENCES users(id),
    created_at      INTEGER NOT NULL,
    disabled_at     INTEGER,
    UNIQUE (org_id, name)
);

CREATE TABLE api_keys (
    id              TEXT PRIMARY KEY,
    org_id          TEXT NOT NULL REFERENCES orgs(id),
    principal_kind  TEXT NOT NULL CHECK (principal_kind IN ('user', 'agent')),
    principal_id    TEXT NOT NULL,
    hash            TEXT NOT NULL UNIQUE,
    prefix          TEXT NOT NULL,
    last_four       TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER,
    revoked_at      INTEGER
);
CREATE INDEX api_keys_org ON api_keys (org_id, created_at);

CREATE TABLE sessions (
    id          TEXT PRIMARY KEY,
    org_id      TEXT NOT NULL REFERENCES orgs(id),
    agent_id    TEXT NOT NULL REFERENCES agents(id),
    hash        TEXT NOT NULL UNIQUE,
    scopes      TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);
CREATE INDEX sessions_org ON sessions (org_id, agent_id);

CREATE TABLE actions (
    id               TEXT PRIMARY KEY,
    org_id           TEXT NOT NULL REFERENCES orgs(id),
    agent_id         TEXT NOT NULL REFERENCES agents(id),
    agent_name       TEXT NOT NULL,
    session_id       TEXT,
    capability       TEXT NOT NULL,
    params           TEXT NOT NULL,
    reasoning        TEXT NOT NULL,
    target           TEXT,
    idempotency_key  TEXT,
    state            TEXT NOT NULL,
    verdict          TEXT,
    approval_id      TEXT,
    result           TEXT,
    error            TEXT,
    request_hash     TEXT NOT NULL,
    created_at       INTEGER NOT NULL,
    decided_at       INTEGER,
    started_at       INTEGER,
    finished_at      INTEGER
);
CREATE UNIQUE INDEX actions_idempotency ON actions (org_id, agent_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX actions_org_id ON actions (org_id, id);
CREATE INDEX actions_precedent ON actions (org_id, agent_id, capability, state);
CREATE INDEX actions_unfinished ON actions (state) WHERE state IN ('approved', 'executing');

CREATE TABLE approvals (
    id              TEXT PRIMARY KEY,
    org_id          TEXT NOT NULL REFERENCES orgs(id),
    action_id       TEXT NOT NULL UNIQUE REFERENCES actions(id),
    group_name      TEXT NOT NULL,
    quorum          INTEGER NOT NULL CHECK (quorum >= 1),
    status          TEXT NOT NULL,
    expires_at      INTEGER NOT NULL,
    token_hash      TEXT NOT NULL UNIQUE,
    policy_version  TEXT NOT NULL,
    request_hash    TEXT NOT NULL,
    rule            TEXT NOT NULL,
    snapshot        TEXT,
    risk            TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    decided_at      INTEGER
);
CREATE INDEX approvals_queue ON approvals (org_id, status, created_at);
CREATE INDEX approvals_pending_deadline ON approvals (expires_at) WHERE status = 'pending';

CREATE TABLE decisions (
    approval_id  TEXT NOT NULL REFERENCES approvals(id),
    org_id       TEXT NOT NULL REFERENCES orgs(id),
    user_id      TEXT NOT NULL REFERENCES users(id),
    user_name    TEXT NOT NULL,
    decision     TEXT NOT NULL CHECK (decision IN ('approve', 'deny')),
    note         TEXT,
    counted      INTEGER NOT NULL,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (approval_id, user_id)
);

CREATE TABLE audit_events (
    org_id     TEXT NOT NULL REFERENCES orgs(id),
    seq        INTEGER NOT NULL,
    id         TEXT NOT NULL UNIQUE,
    time_us    INTEGER NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    subject    TEXT,
    data       TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL,
    PRIMARY KEY (org_id, seq)
) WITHOUT ROWID;
CREATE INDEX audit_events_subject ON audit_events (org_id, subject);

-- The audit log is append-only: no code path updates or deletes an event, and the schema refuses it.
CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit events are append-only');
END;
CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit events are append-only');
END;

CREATE TABLE policies (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    org_id      TEXT NOT NULL REFERENCES orgs(id),
    version     TEXT NOT NULL,
    sources     TEXT NOT NULL,
    origin      TEXT NOT NULL CHECK (origin IN ('file', 'api')),
    created_at  INTEGER NOT NULL
);
CREATE INDEX policies_org ON policies (org_id, seq);
