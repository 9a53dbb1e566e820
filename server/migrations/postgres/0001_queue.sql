-- vmfarm's queue. Times are unix milliseconds; flags are 0/1 integers so that the same queries
-- run on SQLite and PostgreSQL.

CREATE TABLE job_groups (
    id          BIGSERIAL PRIMARY KEY,
    created_at  BIGINT NOT NULL,
    schedule    TEXT
);

CREATE TABLE jobs (
    id               BIGSERIAL PRIMARY KEY,
    group_id         BIGINT NOT NULL REFERENCES job_groups (id),
    image            TEXT NOT NULL,
    state            TEXT NOT NULL,
    priority         BIGINT NOT NULL,
    attempt          BIGINT NOT NULL DEFAULT 1,
    manifest         TEXT NOT NULL,
    tags             TEXT NOT NULL,
    secrets          TEXT NOT NULL DEFAULT '[]',
    timeout_ms       BIGINT NOT NULL,
    created_at       BIGINT NOT NULL,
    started_at       BIGINT,
    finished_at      BIGINT,
    image_version    TEXT,
    reason           TEXT,
    worker           TEXT,
    lease_id         TEXT,
    fence            BIGINT NOT NULL DEFAULT 0,
    lease_expires_at BIGINT,
    leased_at        BIGINT,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    log_size         BIGINT NOT NULL DEFAULT 0,
    log_seq          BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX jobs_queue ON jobs (state, image, priority DESC, id);
CREATE INDEX jobs_group ON jobs (group_id);
CREATE INDEX jobs_lease ON jobs (lease_id);
CREATE INDEX jobs_expiry ON jobs (lease_expires_at);

CREATE TABLE job_tags (
    job_id  BIGINT NOT NULL REFERENCES jobs (id),
    tag     TEXT NOT NULL,
    PRIMARY KEY (job_id, tag)
);
CREATE INDEX job_tags_by_tag ON job_tags (tag, job_id);

CREATE TABLE tasks (
    job_id      BIGINT NOT NULL REFERENCES jobs (id),
    idx         BIGINT NOT NULL,
    name        TEXT NOT NULL,
    state       TEXT NOT NULL,
    exit_code   BIGINT,
    started_at  BIGINT,
    finished_at BIGINT,
    PRIMARY KEY (job_id, idx)
);

CREATE TABLE log_chunks (
    job_id  BIGINT NOT NULL REFERENCES jobs (id),
    off     BIGINT NOT NULL,
    stream  TEXT NOT NULL,
    task    TEXT,
    ts_ms   BIGINT NOT NULL,
    len     BIGINT NOT NULL,
    data    TEXT NOT NULL,
    PRIMARY KEY (job_id, off)
);

CREATE TABLE artifacts (
    job_id      BIGINT NOT NULL REFERENCES jobs (id),
    name        TEXT NOT NULL,
    size        BIGINT NOT NULL,
    sha256      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (job_id, name)
);

CREATE TABLE workers (
    name       TEXT PRIMARY KEY,
    last_seen  BIGINT NOT NULL,
    slots      BIGINT NOT NULL,
    images     TEXT NOT NULL,
    version    TEXT NOT NULL
);

CREATE TABLE tokens (
    hash        TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    kind        TEXT NOT NULL,
    scopes      TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE secrets (
    name        TEXT PRIMARY KEY,
    value       BYTEA NOT NULL,
    updated_at  BIGINT NOT NULL
);
