-- The audit log as a rowid table. As a WITHOUT ROWID table its rows were stored in index pages, whose cells
-- keep at most 488 bytes of a row on 2,048-byte pages: most events are longer, so each spilled into an
-- overflow page of its own, and appending a call's events rewrote several of those pages and their
-- neighbours. A rowid table keeps an event whole in its leaf (up to 2,013 bytes) and appends at the end;
-- (org_id, seq) stays the primary key, now as its own index. Same columns, same rows, same rules.
CREATE TABLE audit_events_new (
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
);
INSERT INTO audit_events_new (org_id, seq, id, time_us, actor, action, subject, data, prev_hash, hash)
    SELECT org_id, seq, id, time_us, actor, action, subject, data, prev_hash, hash
    FROM audit_events ORDER BY org_id, seq;
-- Dropping the table drops its index and triggers with it, and fires no delete trigger.
DROP TABLE audit_events;
ALTER TABLE audit_events_new RENAME TO audit_events;
-- With seq, as the WITHOUT ROWID index carried it: a subject's events are found in seq order, a page at a time.
CREATE INDEX audit_events_subject ON audit_events (org_id, subject, seq);

-- The rules of 0001 and 0002, as they were: no update, and a delete only of a retained prefix behind a
-- checkpoint.
CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit events are append-only');
END;
CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
WHEN NOT EXISTS (
    SELECT 1 FROM audit_retention r
    WHERE r.org_id = OLD.org_id AND OLD.seq <= r.deleted_upto
      AND EXISTS (SELECT 1 FROM audit_checkpoints c WHERE c.org_id = OLD.org_id AND c.seq = r.deleted_upto)
)
BEGIN
    SELECT RAISE(ABORT, 'audit events are append-only');
END;
