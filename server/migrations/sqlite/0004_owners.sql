-- Owners: every job, group, schedule, secret and token belongs to a user. What existed before
-- owners belongs to the built-in `admin` user, which cannot log in with a password.

ALTER TABLE users ADD COLUMN admin BIGINT NOT NULL DEFAULT 0;
INSERT INTO users (name, password_hash, created_at, admin) VALUES ('admin', '', 0, 1)
    ON CONFLICT (name) DO UPDATE SET admin = 1;

ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT 'admin';
CREATE INDEX jobs_owner ON jobs (owner, id);
ALTER TABLE job_groups ADD COLUMN owner TEXT NOT NULL DEFAULT 'admin';
ALTER TABLE schedules ADD COLUMN owner TEXT NOT NULL DEFAULT 'admin';

-- A token's user; its highest priority (NULL: no cap); `config` tokens are those of the server's
-- config file, dropped at start when the file no longer has them.
ALTER TABLE tokens ADD COLUMN user_name TEXT NOT NULL DEFAULT 'admin';
ALTER TABLE tokens ADD COLUMN max_priority BIGINT;
ALTER TABLE tokens ADD COLUMN source TEXT NOT NULL DEFAULT 'cli';

-- The token a web session was opened with (NULL: a password login): the session ends with it.
-- Sessions opened before this knew neither their token nor their user: they end here (one more
-- login each).
DELETE FROM web_sessions;
ALTER TABLE web_sessions ADD COLUMN token_hash TEXT;

-- A secret's owner and the other users whose jobs may name it (comma-separated). `sealed` = 1:
-- value is a nonce and the AEAD ciphertext; 0: a value stored before encryption, sealed by the
-- server's next start.
ALTER TABLE secrets ADD COLUMN owner TEXT NOT NULL DEFAULT 'admin';
ALTER TABLE secrets ADD COLUMN shared_with TEXT NOT NULL DEFAULT '';
ALTER TABLE secrets ADD COLUMN sealed BIGINT NOT NULL DEFAULT 0;
