-- Named queries of the DIMSE services (C-MOVE/C-GET matching, auto-routing).

-- name: retrieve_instances
-- The instances a C-MOVE/C-GET identifier names (PS3.4 C.4.2.2.1: unique keys, lists allowed); a NULL
-- argument does not restrict.
-- transfer_syntax_uid: as received (storage compression keeps it in pixel.original_syntax; dicomweb/compress.py).
SELECT i.sop_instance_uid, i.sop_class_uid, COALESCE(i.pixel ->> 'original_syntax', i.transfer_syntax_uid)
       AS transfer_syntax_uid, i.blob_key, i.size_bytes, se.series_uid, st.study_uid, st.patient_id
FROM instances i JOIN series se USING (series_pk) JOIN studies st ON st.study_pk = i.study_pk
WHERE ($1::text[] IS NULL OR st.study_uid = ANY($1::text[]))
  AND ($2::text[] IS NULL OR se.series_uid = ANY($2::text[]))
  AND ($3::text[] IS NULL OR i.sop_instance_uid = ANY($3::text[]))
  AND ($4::text IS NULL OR st.patient_id = $4::text)
ORDER BY st.study_pk, se.series_number NULLS LAST, se.series_pk, i.instance_number NULLS LAST, i.instance_pk
LIMIT 65536;

-- name: routed_instance
SELECT i.sop_instance_uid, i.sop_class_uid,
       COALESCE(i.pixel ->> 'original_syntax', i.transfer_syntax_uid) AS transfer_syntax_uid, i.blob_key, i.size_bytes
FROM instances i WHERE i.sop_instance_uid = $1;

-- name: routing_status
-- Auto-routing jobs, newest first: the visible status of forwarding (state, attempts, last error).
SELECT id, state, attempts, max_attempts, payload ->> 'destination' AS destination,
       payload ->> 'instance' AS instance, payload ->> 'rule' AS rule, last_error, created_at, run_at, finished_at
FROM jobs WHERE kind = 'dimse.route'
ORDER BY id DESC LIMIT $1;
