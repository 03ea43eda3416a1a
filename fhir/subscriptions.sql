-- Subscriptions (fhir/subscriptions.py): the active ones are found by the type their criteria name. There are
-- few Subscriptions; these read them through the primary key's `resource_type` prefix.

-- name: any_active
-- Is there an active Subscription on resource type $1? (the write hook's one query per write)
SELECT EXISTS (
    SELECT 1 FROM fhir_resources
    WHERE resource_type = 'Subscription' AND NOT deleted
      AND content->>'status' = 'active' AND split_part(content->>'criteria', '?', 1) = $1
);

-- name: active_on_type
SELECT id, version, content FROM fhir_resources
WHERE resource_type = 'Subscription' AND NOT deleted
  AND content->>'status' = 'active' AND split_part(content->>'criteria', '?', 1) = $1
ORDER BY id;

-- name: job_known
-- A job of kind $1 with dedupe key $2 in any state (a retried notification must not deliver twice).
SELECT EXISTS (SELECT 1 FROM jobs WHERE kind = $1 AND dedupe_key = $2);
