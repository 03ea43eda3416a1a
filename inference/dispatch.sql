-- Named queries of dispatch and results (migrations/0009_inference.sql; the job queue of 0002_jobs.sql).

-- name: debounce_many
-- Quiet-period jobs, one per series of a group-committed ingest ($2 payloads, $3 Series Instance UIDs, each once:
-- ON CONFLICT DO UPDATE may not touch one row twice): queued to run $4 seconds from now, or, when one with the
-- series' key is queued already, pushed to that later time (each new instance of the series restarts the quiet
-- period).
INSERT INTO jobs (kind, payload, dedupe_key, run_at, max_attempts)
SELECT $1, payload::jsonb, series_uid, now() + make_interval(secs => $4), $5
FROM unnest($2::text[], $3::text[]) AS t(payload, series_uid)
ON CONFLICT (kind, dedupe_key) WHERE state = 'queued' AND dedupe_key IS NOT NULL
DO UPDATE SET run_at = GREATEST(jobs.run_at, EXCLUDED.run_at);

-- name: series_facts
SELECT st.study_uid, se.series_uid, se.modality, se.body_part_examined, se.series_description, st.patient_id,
       coalesce(array(SELECT DISTINCT i.sop_class_uid FROM instances i WHERE i.series_pk = se.series_pk), '{}')
           AS sop_classes,
       (SELECT count(*) FROM instances i WHERE i.series_pk = se.series_pk) AS instances,
       coalesce(array(SELECT DISTINCT s2.modality FROM series s2
                      WHERE s2.study_pk = st.study_pk AND s2.modality IS NOT NULL ORDER BY 1), '{}') AS modalities
FROM series se JOIN studies st ON st.study_pk = se.study_pk
WHERE se.series_uid = $1;

-- name: series_instances
SELECT i.sop_instance_uid, i.blob_key, i.size_bytes
FROM instances i JOIN series se ON se.series_pk = i.series_pk
WHERE se.series_uid = $1
ORDER BY i.instance_number NULLS LAST, i.sop_instance_uid
LIMIT $2;

-- name: instance_exists
SELECT 1 FROM instances WHERE sop_instance_uid = $1;

-- name: claim_result
-- Idempotency: one result row per (series, model, version); only the first claim gets a row back.
INSERT INTO inference_results (study_uid, series_uid, model_name, model_version, shadow)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (series_uid, model_name, model_version) DO NOTHING
RETURNING id;

-- name: requeue_failed
-- An on-demand request for a result that failed for good runs it again.
UPDATE inference_results SET state = 'queued', last_error = NULL, updated_at = now(), shadow = $4
WHERE series_uid = $1 AND model_name = $2 AND model_version = $3 AND state = 'failed'
RETURNING id;

-- name: result
SELECT id, study_uid, series_uid, model_name, model_version, state, shadow, attempts, last_error, latency_ms,
       stats, output_series_uid, output_instances, report_id, feedback, created_at, updated_at, finished_at
FROM inference_results WHERE series_uid = $1 AND model_name = $2 AND model_version = $3;

-- name: start_result
UPDATE inference_results SET state = 'running', attempts = attempts + 1, updated_at = now()
WHERE id = $1;

-- name: record_outputs
-- updated_at is when the state last changed (the API's `state_since`): recording outputs leaves it.
UPDATE inference_results SET output_series_uid = $2, output_instances = $3 WHERE id = $1;

-- name: record_report
UPDATE inference_results SET report_id = $2 WHERE id = $1;

-- name: finish_result
UPDATE inference_results
SET state = 'succeeded', last_error = NULL, latency_ms = $2, stats = $3::jsonb, updated_at = now(),
    finished_at = now()
WHERE id = $1;

-- name: fail_result
-- $2: 'retrying' (the job queue tries again after a backoff) or 'failed' (for good).
UPDATE inference_results SET state = $2, last_error = $3, updated_at = now(),
    finished_at = CASE WHEN $2 = 'failed' THEN now() ELSE NULL END
WHERE id = $1;

-- name: insert_request
INSERT INTO inference_requests (id, study_uid, series_uid, model_name, model_version, requested_by)
VALUES ($1, $2, $3, $4, $5, $6);

-- name: request
SELECT q.id, q.study_uid, q.series_uid, q.model_name, q.model_version, q.requested_by, q.created_at,
       r.state, r.shadow, r.attempts, r.last_error, r.latency_ms, r.stats, r.output_series_uid,
       r.output_instances, r.report_id, r.finished_at
FROM inference_requests q
LEFT JOIN inference_results r
  ON r.series_uid = q.series_uid AND r.model_name = q.model_name AND r.model_version = q.model_version
WHERE q.id = $1;

-- name: results
-- $5..$7: the policy's constraints on the subject's search (`dicomweb.access.AccessConstraints`): only the studies
-- of these patients (NULL: no such limit), none of these patients, no series of these modalities. $8, $9: the
-- patient (and study) a break-glass session grants (NULL: none), whose results are listed whatever $5..$7 say.
SELECT r.id, r.study_uid, r.series_uid, r.model_name, r.model_version, r.state, r.shadow, r.attempts, r.last_error,
       r.latency_ms, r.stats, r.output_series_uid, r.output_instances, r.report_id, r.feedback, r.created_at,
       r.updated_at, r.finished_at
FROM inference_results r
WHERE ($1::text IS NULL OR r.series_uid = $1) AND ($2::text IS NULL OR r.model_name = $2)
  AND ($3::text IS NULL OR r.model_version = $3)
  AND ((($5::text[] IS NULL OR EXISTS (
          SELECT 1 FROM studies s WHERE s.study_uid = r.study_uid AND s.patient_id = ANY($5::text[])))
        AND (cardinality($6::text[]) = 0 OR NOT EXISTS (
          SELECT 1 FROM studies s WHERE s.study_uid = r.study_uid AND s.patient_id = ANY($6::text[])))
        AND (cardinality($7::text[]) = 0 OR NOT EXISTS (
          SELECT 1 FROM series se WHERE se.series_uid = r.series_uid AND se.modality = ANY($7::text[]))))
    OR ($8::text IS NOT NULL AND ($9::text IS NULL OR r.study_uid = $9) AND EXISTS (
          SELECT 1 FROM studies s WHERE s.study_uid = r.study_uid AND s.patient_id = $8)))
ORDER BY r.id DESC LIMIT $4;

-- name: request_study
SELECT study_uid FROM inference_requests WHERE id = $1;

-- name: report_of
SELECT report_id FROM inference_results WHERE id = $1 FOR UPDATE;

-- name: record_feedback
-- A reviewed AI report: final (accepted) or entered-in-error (rejected), kept per result (and so per version).
UPDATE inference_results SET feedback = $2 WHERE report_id = $1;

-- name: summary_rows
-- Every result of the versions of one model (the newest first, bounded) for the monitoring summary.
SELECT model_version, series_uid, state, shadow, attempts, latency_ms, stats, feedback, created_at, finished_at
FROM inference_results WHERE model_name = $1
ORDER BY id DESC LIMIT $2;
