-- The API key a session was minted with: revoking that key revokes the session too.
ALTER TABLE sessions ADD COLUMN minted_with TEXT;
CREATE INDEX sessions_minted_with ON sessions (org_id, minted_with) WHERE minted_with IS NOT NULL;
