-- Fair share: each owner's queued and running (leased, booting, running) jobs, kept by triggers
-- on every change of a job's state (so that no code path can forget one), and when the owner was
-- last served a lease (unix ms; 0: never). Free slots go to the owner served longest ago.

CREATE TABLE owner_load (
    owner           TEXT PRIMARY KEY,
    queued          BIGINT NOT NULL DEFAULT 0,
    running         BIGINT NOT NULL DEFAULT 0,
    last_served_at  BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX owner_load_turn ON owner_load (last_served_at, owner);

INSERT INTO owner_load (owner, queued, running)
    SELECT owner,
           SUM(CASE WHEN state = 'queued' THEN 1 ELSE 0 END),
           SUM(CASE WHEN state IN ('leased', 'booting', 'running') THEN 1 ELSE 0 END)
    FROM jobs GROUP BY owner;

-- A user's queue, best first, for the lease's per-owner, per-image probes.
CREATE INDEX jobs_owner_queue ON jobs (state, owner, image, priority DESC, id);

CREATE TRIGGER owner_load_insert AFTER INSERT ON jobs
BEGIN
    INSERT OR IGNORE INTO owner_load (owner) VALUES (NEW.owner);
    UPDATE owner_load
       SET queued = queued + (NEW.state = 'queued'),
           running = running + (NEW.state IN ('leased', 'booting', 'running'))
     WHERE owner = NEW.owner;
END;

CREATE TRIGGER owner_load_update AFTER UPDATE OF state ON jobs WHEN OLD.state <> NEW.state
BEGIN
    UPDATE owner_load
       SET queued = queued + (NEW.state = 'queued') - (OLD.state = 'queued'),
           running = running + (NEW.state IN ('leased', 'booting', 'running'))
                             - (OLD.state IN ('leased', 'booting', 'running'))
     WHERE owner = NEW.owner;
END;

CREATE TRIGGER owner_load_delete AFTER DELETE ON jobs
BEGIN
    UPDATE owner_load
       SET queued = queued - (OLD.state = 'queued'),
           running = running - (OLD.state IN ('leased', 'booting', 'running'))
     WHERE owner = OLD.owner;
END;
