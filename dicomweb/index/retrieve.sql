-- Named queries for WADO-RS and WADO-URI.

-- name: study_exists
SELECT study_pk FROM studies WHERE study_uid = $1;

-- name: series_in_study
SELECT se.series_pk FROM series se JOIN studies st USING (study_pk)
WHERE st.study_uid = $1 AND se.series_uid = $2;

-- name: instances_of_study
SELECT i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax_uid, i.blob_key, i.size_bytes, i.sha256,
       se.series_uid, st.study_uid
FROM instances i JOIN series se USING (series_pk) JOIN studies st ON st.study_pk = i.study_pk
WHERE st.study_uid = $1
ORDER BY se.series_number NULLS LAST, se.series_pk, i.instance_number NULLS LAST, i.instance_pk;

-- name: instances_of_series
SELECT i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax_uid, i.blob_key, i.size_bytes, i.sha256,
       se.series_uid, st.study_uid
FROM instances i JOIN series se USING (series_pk) JOIN studies st ON st.study_pk = i.study_pk
WHERE st.study_uid = $1 AND se.series_uid = $2
ORDER BY i.instance_number NULLS LAST, i.instance_pk;

-- name: instance
SELECT i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax_uid, i.blob_key, i.size_bytes, i.sha256,
       se.series_uid, st.study_uid
FROM instances i JOIN series se USING (series_pk) JOIN studies st ON st.study_pk = i.study_pk
WHERE st.study_uid = $1 AND se.series_uid = $2 AND i.sop_instance_uid = $3;

-- name: instance_by_uid
-- WADO-URI names all three UIDs but a lookup by the unique SOP Instance UID is enough; callers compare the rest.
SELECT i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax_uid, i.blob_key, i.size_bytes, i.sha256,
       se.series_uid, st.study_uid
FROM instances i JOIN series se USING (series_pk) JOIN studies st ON st.study_pk = i.study_pk
WHERE i.sop_instance_uid = $1;

-- name: instance_layout
SELECT i.sop_instance_uid, i.transfer_syntax_uid, i.blob_key, i.size_bytes, i.sha256, i.pixel, i.bulk,
       i.number_of_frames, i.rows, i.columns, i.bits_allocated
FROM instances i JOIN series se USING (series_pk) JOIN studies st ON st.study_pk = i.study_pk
WHERE st.study_uid = $1 AND se.series_uid = $2 AND i.sop_instance_uid = $3;

-- name: metadata_of_study
-- One JSON array text, concatenated in the database: the metadata response body without re-encoding.
SELECT count(*) AS n, md5(string_agg(i.sha256, ',' ORDER BY i.instance_pk)) AS etag,
       '[' || coalesce(string_agg(i.metadata, ',' ORDER BY se.series_number NULLS LAST, se.series_pk,
                                  i.instance_number NULLS LAST, i.instance_pk), '') || ']' AS body
FROM instances i JOIN series se USING (series_pk) JOIN studies st ON st.study_pk = i.study_pk
WHERE st.study_uid = $1;

-- name: metadata_of_series
SELECT count(*) AS n, md5(string_agg(i.sha256, ',' ORDER BY i.instance_pk)) AS etag,
       '[' || coalesce(string_agg(i.metadata, ',' ORDER BY i.instance_number NULLS LAST, i.instance_pk), '')
           || ']' AS body
FROM instances i JOIN series se USING (series_pk) JOIN studies st ON st.study_pk = i.study_pk
WHERE st.study_uid = $1 AND se.series_uid = $2;

-- name: metadata_of_instance
SELECT 1 AS n, i.sha256 AS etag, '[' || i.metadata || ']' AS body
FROM instances i JOIN series se USING (series_pk) JOIN studies st ON st.study_pk = i.study_pk
WHERE st.study_uid = $1 AND se.series_uid = $2 AND i.sop_instance_uid = $3;
