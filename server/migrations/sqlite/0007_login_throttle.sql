-- Failed web logins, per key (`user:NAME` or `addr:IP`): how many since `first_at` (unix ms),
-- and until when logins for that key are refused (0: not locked).
CREATE TABLE login_failures (
    key           TEXT PRIMARY KEY,
    failures      BIGINT NOT NULL,
    first_at      BIGINT NOT NULL,
    locked_until  BIGINT NOT NULL DEFAULT 0
);
