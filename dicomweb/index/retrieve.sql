-- Named queries for WADO-RS and WADO-URI.

-- name: study_exists
SELECT study_pk FROM studies WHERE study_uid = $1;

-- name: series_in_study
SELECT se.series_pk FROM series se JOIN studies st USING (study_pk)
WHERE st.study_uid = $1 AND se.series_uid = $2;

-- name: instances_of_study
SELECT i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax_uid, i.blob_key, i.size_bytes, i.sha256,
       i.bits_allocated, se.series_uid, st.study_uid
FROM instances i JOIN series se USING (series_pk) JOIN studies st ON st.study_pk = i.study_pk
WHERE st.study_uid = $1
ORDER BY se.series_number NULLS LAST, se.series_pk, i.instance_number NULLS LAST, i.instance_pk;

-- name: instances_of_series
SELECT i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax_uid, i.blob_key, i.size_bytes, i.sha256,
       i.bits_allocated, se.series_uid, st.study_uid
FROM instances i JOIN series se USING (series_pk) JOIN studies st ON st.study_pk = i.study_pk
WHERE st.study_uid = $1 AND se.series_uid = $2
ORDER BY i.instance_number NULLS LAST, i.instance_pk;

-- name: instance
SELECT i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax_uid, i.blob_key, i.size_bytes, i.sha256,
       i.bits_allocated, se.series_uid, st.study_uid
FROM instances i JOIN series se USING (series_pk) JOIN studies st ON st.study_pk = i.study_pk
WHERE st.study_uid = $1 AND se.series_uid = $2 AND i.sop_instance_uid = $3;

-- name: instance_by_uid
-- WADO-URI names all three UIDs but a lookup by the unique SOP Instance UID is enough; callers compare the rest.
SELECT i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax_uid, i.blob_key, i.size_bytes, i.sha256,
       i.bits_allocated, se.series_uid, st.study_uid
FROM instances i JOIN series se USING (series_pk) JOIN studies st ON st.study_pk = i.study_pk
WHERE i.sop_instance_uid = $1;

-- name: instance_layout
-- With the instance's current renditions (migrations/0008_renditions.sql) as {syntax: {key, frames, codec}}, so
-- that a frame request served from a rendition costs this one query.
SELECT i.instance_pk, i.sop_instance_uid, i.transfer_syntax_uid, i.blob_key, i.size_bytes, i.sha256, i.pixel,
       i.bulk, i.number_of_frames, i.rows, i.columns, i.bits_allocated, se.series_uid, st.study_uid,
       (SELECT jsonb_object_agg(r.transfer_syntax_uid,
                                jsonb_build_object('key', r.blob_key, 'frames', r.frames, 'codec', r.codec))
        FROM renditions r
        WHERE r.instance_pk = i.instance_pk AND r.source_sha256 = i.sha256) AS renditions
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

-- name: instance_attributes
-- The Image Pixel module values a frame decoder needs (PS3.3 C.7.6.3) and one top-level element's VR ($2, e.g.
-- '7FE00010'), from the stored metadata. Parsed only by the requests that decode or byte-swap.
SELECT m -> '00280002' -> 'Value' ->> 0 AS samples_per_pixel,
       m -> '00280101' -> 'Value' ->> 0 AS bits_stored,
       m -> '00280103' -> 'Value' ->> 0 AS pixel_representation,
       m -> '00280004' -> 'Value' ->> 0 AS photometric_interpretation,
       m -> '00280006' -> 'Value' ->> 0 AS planar_configuration,
       m -> $2::text ->> 'vr' AS vr
FROM (SELECT metadata::jsonb AS m FROM instances WHERE sop_instance_uid = $1) AS i;
