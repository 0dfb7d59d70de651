-- What the whole instance records once: today the audit public key checkpoints are signed with, so a start
-- with another key file (a lost one replaced by a new one) is refused instead of signing checkpoints that
-- nothing earlier verifies against. The private key never lives here: it is the data dir's audit-signing.key.
CREATE TABLE instance_secrets (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
) WITHOUT ROWID;
