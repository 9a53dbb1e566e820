-- The web UI's users and sessions, schedules, and trigger deliveries.

CREATE TABLE users (
    name           TEXT PRIMARY KEY,
    password_hash  TEXT NOT NULL,
    created_at     BIGINT NOT NULL
);

-- A session is known by the sha256 of its cookie; csrf is the token its forms carry.
CREATE TABLE web_sessions (
    hash        TEXT PRIMARY KEY,
    user_name   TEXT NOT NULL,
    scopes      TEXT NOT NULL,
    csrf        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX web_sessions_expiry ON web_sessions (expires_at);

-- last_run_at: the scheduled time (unix ms) of the newest run that was enqueued, or the time the
-- schedule was created; the next run is the first cron time after it.
CREATE TABLE schedules (
    name         TEXT PRIMARY KEY,
    cron         TEXT NOT NULL,
    timezone     TEXT NOT NULL,
    manifest     TEXT NOT NULL,
    source       TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    last_run_at  BIGINT NOT NULL
);
CREATE INDEX job_groups_schedule ON job_groups (schedule, id);

CREATE TABLE trigger_deliveries (
    id               BIGSERIAL PRIMARY KEY,
    job_id           BIGINT NOT NULL REFERENCES jobs (id),
    trigger_on       TEXT NOT NULL,
    url              TEXT NOT NULL,
    state            TEXT NOT NULL,
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT NOT NULL,
    last_status      TEXT,
    created_at       BIGINT NOT NULL,
    finished_at      BIGINT
);
CREATE INDEX trigger_deliveries_due ON trigger_deliveries (state, next_attempt_at);
CREATE INDEX trigger_deliveries_job ON trigger_deliveries (job_id);
