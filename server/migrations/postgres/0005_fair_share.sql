-- Fair share: each owner's queued and running (leased, booting, running) jobs, kept by a trigger
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

CREATE FUNCTION owner_load_count(state TEXT, kind TEXT) RETURNS BIGINT AS $$
    SELECT CASE
        WHEN kind = 'queued' AND state = 'queued' THEN 1
        WHEN kind = 'running' AND state IN ('leased', 'booting', 'running') THEN 1
        ELSE 0 END::BIGINT
$$ LANGUAGE SQL IMMUTABLE;

CREATE FUNCTION owner_load_track() RETURNS TRIGGER AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO owner_load (owner) VALUES (NEW.owner) ON CONFLICT (owner) DO NOTHING;
        UPDATE owner_load
           SET queued = queued + owner_load_count(NEW.state, 'queued'),
               running = running + owner_load_count(NEW.state, 'running')
         WHERE owner = NEW.owner;
    ELSIF TG_OP = 'UPDATE' THEN
        IF OLD.state <> NEW.state THEN
            UPDATE owner_load
               SET queued = queued + owner_load_count(NEW.state, 'queued')
                                   - owner_load_count(OLD.state, 'queued'),
                   running = running + owner_load_count(NEW.state, 'running')
                                     - owner_load_count(OLD.state, 'running')
             WHERE owner = NEW.owner;
        END IF;
    ELSE
        UPDATE owner_load
           SET queued = queued - owner_load_count(OLD.state, 'queued'),
               running = running - owner_load_count(OLD.state, 'running')
         WHERE owner = OLD.owner;
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER owner_load_track AFTER INSERT OR UPDATE OF state OR DELETE ON jobs
    FOR EACH ROW EXECUTE FUNCTION owner_load_track();
