-- Named queries of the model registry (migrations/0009_inference.sql).

-- name: insert_model
INSERT INTO inference_models (name, version, task, selector, outputs, status, backend)
VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7::jsonb)
ON CONFLICT (name, version) DO NOTHING
RETURNING name, version, task, selector, outputs, status, backend, created_at, updated_at;

-- name: list_models
SELECT name, version, task, selector, outputs, status, backend, created_at, updated_at
FROM inference_models
WHERE ($1::text IS NULL OR name = $1) AND ($2::text IS NULL OR status = $2)
ORDER BY name, created_at, version;

-- name: get_model
SELECT name, version, task, selector, outputs, status, backend, created_at, updated_at
FROM inference_models WHERE name = $1 AND version = $2;

-- name: running_models
-- Active and shadow models: the candidates for a complete series.
SELECT name, version, task, selector, outputs, status, backend, created_at, updated_at
FROM inference_models WHERE status IN ('active', 'shadow') ORDER BY name, version;

-- name: set_status
UPDATE inference_models SET status = $3, updated_at = now() WHERE name = $1 AND version = $2
RETURNING name, version, task, selector, outputs, status, backend, created_at, updated_at;

-- name: retire_other_active
-- Promoting a version retires the version of the same name that was active (one active version per name).
UPDATE inference_models SET status = 'retired', updated_at = now()
WHERE name = $1 AND version <> $2 AND status = 'active';

-- name: lock_name
SELECT pg_advisory_xact_lock(hashtext('inference_models'), hashtext($1));
