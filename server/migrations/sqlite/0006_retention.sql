-- Retention: when a job's logs and artifacts were set to expire (NULL: kept), and whether they
-- are gone (purged = 1). A sweep marks first, then deletes the files, then the rows, then sets
-- purged: a sweep killed midway is finished by the next one.
ALTER TABLE jobs ADD COLUMN expired_at BIGINT;
ALTER TABLE jobs ADD COLUMN purged BIGINT NOT NULL DEFAULT 0;
CREATE INDEX jobs_expiring ON jobs (purged, expired_at);
CREATE INDEX jobs_finished ON jobs (finished_at);
