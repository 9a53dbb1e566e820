-- Fair share: the owners that ever queued a job, and when each was last served a lease (unix
-- microseconds; 0: never). Free slots go to the owner served longest ago, found by walking this
-- index in order. A submit adds its owner's row once (and never changes it); a lease sets its
-- owner's `last_served_us`; state changes never touch it.

CREATE TABLE job_owners (
    owner           TEXT PRIMARY KEY,
    last_served_us  BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX job_owners_turn ON job_owners (last_served_us, owner);
INSERT INTO job_owners (owner) SELECT DISTINCT owner FROM jobs;

-- A user's queue, best first, for the lease's per-owner, per-image probes (and its counts).
CREATE INDEX jobs_owner_queue ON jobs (state, owner, image, priority DESC, id);
