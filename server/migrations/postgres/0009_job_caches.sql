-- The names of a job's [[caches]], space-separated ('' for none): a lease leaves such a job a
-- little while for a worker that holds them.
ALTER TABLE jobs ADD COLUMN caches TEXT NOT NULL DEFAULT '';
CREATE INDEX jobs_queued_with_caches ON jobs (created_at) WHERE state = 'queued' AND caches <> '';
