-- The job queue for derived work (FHIR sync, renditions, AI dispatch, blob collection). Jobs are inserted in the
-- same transaction as the change that needs them, taken with FOR UPDATE SKIP LOCKED, announced by NOTIFY.
CREATE TABLE job_states (
    name text PRIMARY KEY
);
INSERT INTO job_states VALUES ('queued'), ('running'), ('done'), ('failed');

-- The job state machine as a table (house style 8): a transition not listed here is refused by the trigger.
CREATE TABLE job_transitions (
    from_state text NOT NULL REFERENCES job_states,
    to_state   text NOT NULL REFERENCES job_states,
    PRIMARY KEY (from_state, to_state)
);
INSERT INTO job_transitions VALUES
    ('queued', 'running'),   -- a worker took it
    ('running', 'done'),     -- it succeeded
    ('running', 'queued'),   -- it failed and will be retried after a backoff, or its worker's lease expired
    ('running', 'failed'),   -- it failed for the last time
    ('failed', 'queued');    -- an operator asked for a retry

CREATE TABLE jobs (
    id           bigserial PRIMARY KEY,
    kind         text NOT NULL,
    payload      jsonb NOT NULL DEFAULT '{}',
    state        text NOT NULL DEFAULT 'queued' REFERENCES job_states,
    dedupe_key   text,
    attempts     integer NOT NULL DEFAULT 0,
    max_attempts integer NOT NULL DEFAULT 8,
    run_at       timestamptz NOT NULL DEFAULT now(),
    locked_at    timestamptz,
    worker       text,
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
CREATE INDEX jobs_ready ON jobs (run_at, id) WHERE state = 'queued';
CREATE INDEX jobs_running ON jobs (locked_at) WHERE state = 'running';
-- At most one queued job per (kind, dedupe_key): a burst of events for one series makes one job.
CREATE UNIQUE INDEX jobs_dedupe ON jobs (kind, dedupe_key) WHERE state = 'queued' AND dedupe_key IS NOT NULL;

CREATE FUNCTION jobs_check_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state <> OLD.state AND NOT EXISTS (
        SELECT 1 FROM job_transitions WHERE from_state = OLD.state AND to_state = NEW.state
    ) THEN
        RAISE EXCEPTION 'job %: transition % -> % is not allowed', OLD.id, OLD.state, NEW.state;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER jobs_transition BEFORE UPDATE OF state ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_check_transition();

CREATE FUNCTION jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('hounsfield_jobs', NEW.kind);
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_notify AFTER INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION jobs_notify();
