-- Secrets every replica must share, written once by whichever replica starts first: today the audit
-- checkpoint signing key, so checkpoints from any replica verify with the one public key.
CREATE TABLE instance_secrets (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
