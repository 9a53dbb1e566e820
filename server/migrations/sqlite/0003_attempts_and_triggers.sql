-- A job's triggers, as its manifest said them at submit (a JSON array of {on, webhook}), so that
-- its end need not parse the manifest again.
ALTER TABLE jobs ADD COLUMN triggers TEXT NOT NULL DEFAULT '[]';

-- The attempt an artifact belongs to: its file is stored under <job>/<attempt>/. NULL: stored
-- before attempts had folders of their own, directly under <job>/.
ALTER TABLE artifacts ADD COLUMN attempt BIGINT;

-- Each worker's proxy cache figures, as its last lease call gave them (JSON), for /metrics.
ALTER TABLE workers ADD COLUMN cache TEXT NOT NULL DEFAULT '{}';
