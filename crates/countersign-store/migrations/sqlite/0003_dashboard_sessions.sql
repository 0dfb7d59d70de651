-- Dashboard logins, shared by every process on the database (several replicas behind a load balancer that
-- is not sticky accept the same cookie). Only the SHA-256 of the cookie token is kept; the CSRF token is
-- derived from the cookie token (HMAC) and is not stored. Times are microseconds since the epoch.
CREATE TABLE dashboard_sessions (
    token_hash    TEXT PRIMARY KEY,
    org_id        TEXT NOT NULL REFERENCES orgs(id),
    user_id       TEXT NOT NULL REFERENCES users(id),
    key_hash      TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    last_seen_at  INTEGER NOT NULL,
    revoked_at    INTEGER
);
CREATE INDEX dashboard_sessions_expiry ON dashboard_sessions (expires_at);
