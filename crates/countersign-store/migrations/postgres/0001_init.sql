-- Countersign schema for PostgreSQL: everything the two SQLite migrations create, plus `audit_heads`.
-- Times are microseconds since the Unix epoch (BIGINT); JSON is TEXT, stored byte for byte as written (the
-- audit filter casts `actor::jsonb` where it needs a field). Every integer is BIGINT so that one Rust type
-- (i64) reads every column. Every tenant table carries org_id, and every query filters on it.

CREATE TABLE orgs (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

CREATE TABLE users (
    id              TEXT PRIMARY KEY,
    org_id          TEXT NOT NULL REFERENCES orgs(id),
    name            TEXT NOT NULL,
    role            TEXT NOT NULL CHECK (role IN ('admin', 'approver', 'viewer')),
    instance_admin  BOOLEAN NOT NULL DEFAULT FALSE,
    created_at      BIGINT NOT NULL,
    disabled_at     BIGINT,
    UNIQUE (org_id, name)
);

CREATE TABLE agents (
    id              TEXT PRIMARY KEY,
    org_id          TEXT NOT NULL REFERENCES orgs(id),
    name            TEXT NOT NULL,
    owner_user_id   TEXT REFERENCES users(id),
    created_at      BIGINT NOT NULL,
    disabled_at     BIGINT,
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
    created_at      BIGINT NOT NULL,
    expires_at      BIGINT,
    revoked_at      BIGINT
);
CREATE INDEX api_keys_org ON api_keys (org_id, created_at);

CREATE TABLE sessions (
    id          TEXT PRIMARY KEY,
    org_id      TEXT NOT NULL REFERENCES orgs(id),
    agent_id    TEXT NOT NULL REFERENCES agents(id),
    hash        TEXT NOT NULL UNIQUE,
    scopes      TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    revoked_at  BIGINT
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
    created_at       BIGINT NOT NULL,
    decided_at       BIGINT,
    started_at       BIGINT,
    finished_at      BIGINT,
    job_id           TEXT
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
    quorum          BIGINT NOT NULL CHECK (quorum >= 1),
    status          TEXT NOT NULL,
    expires_at      BIGINT NOT NULL,
    token_hash      TEXT NOT NULL UNIQUE,
    policy_version  TEXT NOT NULL,
    request_hash    TEXT NOT NULL,
    rule            TEXT NOT NULL,
    snapshot        TEXT,
    risk            TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    decided_at      BIGINT
);
CREATE INDEX approvals_queue ON approvals (org_id, status, created_at);
CREATE INDEX approvals_org_id ON approvals (org_id, id);
CREATE INDEX approvals_pending_deadline ON approvals (expires_at) WHERE status = 'pending';

CREATE TABLE decisions (
    approval_id  TEXT NOT NULL REFERENCES approvals(id),
    org_id       TEXT NOT NULL REFERENCES orgs(id),
    user_id      TEXT NOT NULL REFERENCES users(id),
    user_name    TEXT NOT NULL,
    decision     TEXT NOT NULL CHECK (decision IN ('approve', 'deny')),
    note         TEXT,
    counted      BOOLEAN NOT NULL,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (approval_id, user_id)
);

CREATE TABLE audit_events (
    org_id     TEXT NOT NULL REFERENCES orgs(id),
    seq        BIGINT NOT NULL,
    id         TEXT NOT NULL UNIQUE,
    time_us    BIGINT NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    subject    TEXT,
    data       TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL,
    PRIMARY KEY (org_id, seq)
);
CREATE INDEX audit_events_subject ON audit_events (org_id, subject);
CREATE INDEX audit_events_time ON audit_events (org_id, time_us);

-- The head of each org's chain. `append_audit` locks this row (`SELECT … FOR UPDATE`) before sealing the
-- next event after it, and moves it in the same transaction, so appends from several replicas queue on the
-- row and the chain stays gapless. Retention never moves it: the head survives even a deleted prefix.
CREATE TABLE audit_heads (
    org_id  TEXT PRIMARY KEY REFERENCES orgs(id),
    seq     BIGINT NOT NULL,
    hash    TEXT NOT NULL
);

CREATE TABLE policies (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id      TEXT NOT NULL REFERENCES orgs(id),
    version     TEXT NOT NULL,
    sources     TEXT NOT NULL,
    origin      TEXT NOT NULL CHECK (origin IN ('file', 'api')),
    created_at  BIGINT NOT NULL
);
CREATE INDEX policies_org ON policies (org_id, seq);

CREATE TABLE jobs (
    id            TEXT PRIMARY KEY,
    org_id        TEXT NOT NULL REFERENCES orgs(id),
    kind          TEXT NOT NULL,
    subject       TEXT,
    state         TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    attempts      BIGINT NOT NULL,
    max_attempts  BIGINT NOT NULL,
    run_at        BIGINT NOT NULL,
    lease_owner   TEXT,
    lease_until   BIGINT,
    payload       TEXT NOT NULL,
    progress      TEXT,
    result        TEXT,
    error         TEXT,
    created_at    BIGINT NOT NULL,
    started_at    BIGINT,
    finished_at   BIGINT
);
CREATE INDEX jobs_org ON jobs (org_id, id);
CREATE INDEX jobs_subject ON jobs (org_id, subject);
CREATE INDEX jobs_due ON jobs (run_at) WHERE state = 'queued';
CREATE INDEX jobs_leased ON jobs (lease_until) WHERE state = 'running';

CREATE TABLE webhooks (
    id           TEXT PRIMARY KEY,
    org_id       TEXT NOT NULL REFERENCES orgs(id),
    url          TEXT NOT NULL,
    events       TEXT NOT NULL,
    secret       TEXT NOT NULL,
    format       TEXT NOT NULL CHECK (format IN ('json', 'slack')),
    description  TEXT,
    created_at   BIGINT NOT NULL,
    deleted_at   BIGINT
);
CREATE INDEX webhooks_org ON webhooks (org_id, id);

CREATE TABLE webhook_deliveries (
    id          TEXT PRIMARY KEY,
    org_id      TEXT NOT NULL REFERENCES orgs(id),
    webhook_id  TEXT NOT NULL REFERENCES webhooks(id),
    job_id      TEXT NOT NULL REFERENCES jobs(id),
    event_id    TEXT NOT NULL,
    event_type  TEXT NOT NULL,
    attempt     BIGINT NOT NULL,
    status      BIGINT,
    latency_ms  BIGINT NOT NULL,
    error       TEXT,
    created_at  BIGINT NOT NULL
);
CREATE INDEX webhook_deliveries_webhook ON webhook_deliveries (org_id, webhook_id, id);

CREATE TABLE audit_checkpoints (
    org_id     TEXT NOT NULL REFERENCES orgs(id),
    seq        BIGINT NOT NULL,
    head_hash  TEXT NOT NULL,
    time_us    BIGINT NOT NULL,
    key_id     TEXT NOT NULL,
    signature  TEXT NOT NULL,
    PRIMARY KEY (org_id, seq)
);

-- Per org: the retention window, and how far retention has deleted. The delete trigger below lets
-- retention remove a prefix up to `deleted_upto` and nothing else; a signed checkpoint at that seq keeps
-- the rest of the chain verifiable.
CREATE TABLE audit_retention (
    org_id        TEXT PRIMARY KEY REFERENCES orgs(id),
    days          BIGINT,
    deleted_upto  BIGINT NOT NULL DEFAULT 0
);

-- The audit log is append-only: no code path updates or deletes an event, and the schema refuses it.
CREATE FUNCTION audit_events_refuse_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit events are append-only';
END;
$$;
CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_refuse_update();

-- A delete is allowed only inside the prefix retention has declared, and only behind a checkpoint at
-- exactly its end.
CREATE FUNCTION audit_events_guard_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM audit_retention r
        WHERE r.org_id = OLD.org_id AND OLD.seq <= r.deleted_upto
          AND EXISTS (SELECT 1 FROM audit_checkpoints c WHERE c.org_id = OLD.org_id AND c.seq = r.deleted_upto)
    ) THEN
        RAISE EXCEPTION 'audit events are append-only';
    END IF;
    RETURN OLD;
END;
$$;
CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_guard_delete();

-- TRUNCATE skips row triggers; refuse it outright on the append-only tables.
CREATE FUNCTION audit_refuse_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END;
$$;
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_truncate();
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_truncate();

CREATE FUNCTION audit_retention_refuse_backward() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit retention only moves forward';
END;
$$;
CREATE TRIGGER audit_retention_forward BEFORE UPDATE ON audit_retention
    FOR EACH ROW WHEN (NEW.deleted_upto < OLD.deleted_upto) EXECUTE FUNCTION audit_retention_refuse_backward();

CREATE FUNCTION audit_checkpoints_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit checkpoints are append-only';
END;
$$;
CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_checkpoints_refuse_change();
CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_checkpoints_refuse_change();
