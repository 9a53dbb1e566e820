-- Pushes: a ref of a configured repository that moved (a forge's webhook, or a git server's
-- post-receive hook), and what each manifest file of the pushed commit became. A forge's
-- delivery id is unique per forge, so a replayed delivery builds nothing.
CREATE TABLE pushes (
    id          INTEGER PRIMARY KEY,
    repository  TEXT NOT NULL,
    url         TEXT NOT NULL,
    git_ref     TEXT NOT NULL,
    git_commit  TEXT NOT NULL,
    owner       TEXT NOT NULL,
    via         TEXT NOT NULL,
    delivery    TEXT,
    created_at  BIGINT NOT NULL
);
CREATE UNIQUE INDEX pushes_delivery ON pushes (via, delivery);
CREATE INDEX pushes_branch ON pushes (repository, git_ref, id);

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
