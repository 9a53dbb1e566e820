-- Web login attempts that were not (yet) followed by a success, per key (`user:NAME` or
-- `addr:IP`): how many since `first_at` (unix ms). Counted before the password is checked, in
-- one statement, so that attempts sent at once cannot all slip under the limit.
CREATE TABLE login_failures (
    key       TEXT PRIMARY KEY,
    failures  BIGINT NOT NULL,
    first_at  BIGINT NOT NULL
);
-- Rows older than the window are dropped by each attempt, so the table holds one window's worth.
CREATE INDEX login_failures_age ON login_failures (first_at);
