-- Named queries for break-glass sessions (migrations/0005_break_glass.sql; authz/breakglass.py).

-- name: insert_session
INSERT INTO break_glass_sessions
    (id, sub, issuer, roles, client_id, client_ip, reason, patient_id, study_uid, started_at, expires_at)
VALUES ($1, $2, $3, $4::text[], $5, $6, $7, $8, $9, $10, $11)
RETURNING *;

-- name: lock_subject
-- Serializes the starts of one subject (issuer $1, sub $2) until the transaction ends, so that concurrent starts
-- see each other's session and open one between them.
SELECT pg_advisory_xact_lock(hashtextextended('break_glass:' || $1 || ':' || $2, 0));

-- name: open_session
-- The subject's open session that lasts longest (the guard, on every request; a start, under lock_subject): one
-- probe of the partial index break_glass_open. $3 is the server's current time. A session that names no patient
-- grants nothing (authz/policies/authz.rego) and is not one.
SELECT * FROM break_glass_sessions
WHERE issuer = $1 AND sub = $2 AND closed_at IS NULL AND expires_at > $3 AND patient_id IS NOT NULL
ORDER BY expires_at DESC
LIMIT 1;

-- name: get_session
SELECT * FROM break_glass_sessions WHERE id = $1;

-- name: lock_session
SELECT * FROM break_glass_sessions WHERE id = $1 FOR UPDATE;

-- name: list_sessions
-- $1: true = only open (not closed, not expired at $2), false = only ended, null = all. Newest first.
SELECT * FROM break_glass_sessions
WHERE $1::boolean IS NULL OR $1 = (closed_at IS NULL AND expires_at > $2)
ORDER BY started_at DESC, id
LIMIT $3 OFFSET $4;

-- name: close_session
UPDATE break_glass_sessions SET closed_at = $2, closed_by = $3, close_comment = $4
WHERE id = $1 AND closed_at IS NULL
RETURNING *;

-- name: mark_alerted
UPDATE break_glass_sessions SET alerted_at = $2 WHERE id = $1 AND alerted_at IS NULL;
