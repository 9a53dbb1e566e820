-- Pushes: a ref of a configured repository that moved (a forge's webhook, or a git server's
-- post-receive hook), and what each manifest file of the pushed commit became. A forge's
-- delivery id is unique per forge, so a replayed delivery builds nothing.
CREATE TABLE pushes (
    id          BIGSERIAL PRIMARY KEY,
    repository  TEXT NOT NULL,
    url         TEXT NOT NULL,
    git_ref     TEXT NOT NULL,
    git_commit  TEXT NOT NULL,
    owner       TEXT NOT NULL,
    via         TEXT NOT NULL,
    delivery    TEXT,
    -- 1: its jobs report their state to the forge as commit statuses.
    reports     BIGINT NOT NULL DEFAULT 0,
    created_at  BIGINT NOT NULL
);
CREATE UNIQUE INDEX pushes_delivery ON pushes (via, delivery);
CREATE INDEX pushes_branch ON pushes (repository, git_ref, id);
-- A ref builds a commit once: a redelivery under another id is no new push.
CREATE UNIQUE INDEX pushes_commit ON pushes (repository, git_ref, git_commit);

CREATE TABLE push_files (
    push_id   BIGINT NOT NULL REFERENCES pushes (id),
    file      TEXT NOT NULL,
    group_id  BIGINT REFERENCES job_groups (id),
    -- JSON list of {line, column, message} when the file built nothing.
    errors    TEXT,
    PRIMARY KEY (push_id, file)
);

-- A pushed job's push and manifest file; a rerun's original job.
ALTER TABLE jobs ADD COLUMN push_id BIGINT REFERENCES pushes (id);
ALTER TABLE jobs ADD COLUMN manifest_file TEXT;
ALTER TABLE jobs ADD COLUMN rerun_of BIGINT;
CREATE INDEX jobs_push ON jobs (push_id);

-- Commit statuses to the forge, one per pushed job's state change (`report`: queued, then its
-- final state), in the outbox's shape (see trigger_deliveries): sent in order per job.
CREATE TABLE status_reports (
    id               BIGSERIAL PRIMARY KEY,
    job_id           BIGINT NOT NULL REFERENCES jobs (id),
    report           TEXT NOT NULL,
    state            TEXT NOT NULL,
    attempts         BIGINT NOT NULL DEFAULT 0,
    last_status      TEXT,
    next_attempt_at  BIGINT NOT NULL,
    created_at       BIGINT NOT NULL,
    finished_at      BIGINT
);
CREATE INDEX status_reports_due ON status_reports (state, next_attempt_at);
CREATE INDEX status_reports_job ON status_reports (job_id, id);
