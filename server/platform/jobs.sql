-- Named queries for the job queue (see migrations/0002_jobs.sql).

-- name: enqueue
-- A queued job with the same (kind, dedupe_key) absorbs the new one (its payload is kept).
INSERT INTO jobs (kind, payload, dedupe_key, run_at, max_attempts)
VALUES ($1, $2::jsonb, $3, now() + make_interval(secs => $4), $5)
ON CONFLICT (kind, dedupe_key) WHERE state = 'queued' AND dedupe_key IS NOT NULL DO NOTHING
RETURNING id;

-- name: enqueue_many
-- Many jobs in one statement (the listeners of a group-committed ingest): the same rule as enqueue, a queued job
-- with the same (kind, dedupe_key) absorbs a new one, and so does the first of the batch its later duplicates
-- (ON CONFLICT DO UPDATE may not touch one row twice: the duplicates are dropped before the insert).
INSERT INTO jobs (kind, payload, dedupe_key, run_at, max_attempts)
SELECT kind, payload::jsonb, dedupe_key, now() + make_interval(secs => delay), max_attempts
FROM (
    SELECT DISTINCT ON (kind, coalesce(dedupe_key, ord::text), dedupe_key IS NULL) *
    FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::int[]) WITH ORDINALITY
        AS t(kind, payload, dedupe_key, delay, max_attempts, ord)
    ORDER BY kind, coalesce(dedupe_key, ord::text), dedupe_key IS NULL, ord
) AS first
ORDER BY ord
ON CONFLICT (kind, dedupe_key) WHERE state = 'queued' AND dedupe_key IS NOT NULL DO NOTHING;

-- name: take
-- Take up to $2 ready jobs of the kinds this worker knows; SKIP LOCKED lets many workers share the queue. Jobs of
-- the kinds in $4 (deferred while the process is busy ingesting) are taken only once they are $5 seconds overdue.
UPDATE jobs SET state = 'running', locked_at = now(), worker = $1, attempts = attempts + 1
WHERE id IN (
    SELECT id FROM jobs
    WHERE state = 'queued' AND run_at <= now() AND kind = ANY($3::text[])
      AND (kind <> ALL($4::text[]) OR run_at <= now() - make_interval(secs => $5))
    ORDER BY run_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
RETURNING id, kind, payload, attempts, max_attempts;

-- name: next_due
-- Seconds until the earliest queued job of these kinds is due (negative when overdue); NULL when none is queued.
SELECT extract(epoch FROM min(run_at) - now())::float8 FROM jobs WHERE state = 'queued' AND kind = ANY($1::text[]);

-- name: finish
UPDATE jobs SET state = 'done', finished_at = now(), locked_at = NULL, last_error = NULL
WHERE id = $1 AND state = 'running';

-- name: finish_many
-- The jobs of one batch that succeeded.
UPDATE jobs SET state = 'done', finished_at = now(), locked_at = NULL, last_error = NULL
WHERE id = ANY($1::bigint[]) AND state = 'running';

-- name: retry
UPDATE jobs SET state = 'queued', locked_at = NULL, worker = NULL, last_error = $2,
    run_at = now() + make_interval(secs => $3)
WHERE id = $1 AND state = 'running';

-- name: fail
UPDATE jobs SET state = 'failed', finished_at = now(), locked_at = NULL, last_error = $2
WHERE id = $1 AND state = 'running';

-- name: reclaim_expired
-- A worker that died leaves its jobs running; after the lease they are queued again.
UPDATE jobs SET state = 'queued', locked_at = NULL, worker = NULL,
    last_error = coalesce(last_error, '') || ' [lease expired]'
WHERE state = 'running' AND locked_at < now() - make_interval(secs => $1)
RETURNING id;

-- name: requeue_held
-- The jobs a worker took and could not settle because the database went away (a worker that lives on).
UPDATE jobs SET state = 'queued', locked_at = NULL, worker = NULL,
    last_error = coalesce(last_error, '') || ' [database unavailable]'
WHERE state = 'running' AND worker = $1
RETURNING id;

-- name: get
SELECT id, kind, payload, state, attempts, max_attempts, run_at, last_error, created_at, finished_at
FROM jobs WHERE id = $1;

-- name: counts
SELECT kind, state, count(*) AS n FROM jobs GROUP BY kind, state ORDER BY kind, state;

-- name: purge_done
DELETE FROM jobs WHERE state = 'done' AND finished_at < now() - make_interval(secs => $1);

-- name: schedule
-- Like enqueue, but a queued job with the same key is moved earlier when the new run time is sooner (a restart
-- with a shorter interval takes effect at once).
INSERT INTO jobs (kind, payload, dedupe_key, run_at, max_attempts)
VALUES ($1, $2::jsonb, $3, now() + make_interval(secs => $4), $5)
ON CONFLICT (kind, dedupe_key) WHERE state = 'queued' AND dedupe_key IS NOT NULL
DO UPDATE SET run_at = LEAST(jobs.run_at, EXCLUDED.run_at)
RETURNING id;

-- name: again
-- A copy of running job $1 (kind, payload, run_at) queued under key $2, merged into a queued one with that key.
INSERT INTO jobs (kind, payload, dedupe_key, run_at, max_attempts)
SELECT kind, payload, $2, run_at, max_attempts FROM jobs WHERE id = $1
ON CONFLICT (kind, dedupe_key) WHERE state = 'queued' AND dedupe_key IS NOT NULL
DO UPDATE SET run_at = LEAST(jobs.run_at, EXCLUDED.run_at)
RETURNING id;
