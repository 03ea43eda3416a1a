-- Named queries for renditions (dicomweb/renditions.py; table in migrations/0008_renditions.sql).

-- name: current
SELECT blob_key, frames, codec FROM renditions
WHERE instance_pk = $1 AND transfer_syntax_uid = $2 AND source_sha256 = $3;

-- name: drop_of_instance
DELETE FROM renditions WHERE instance_pk = $1 RETURNING blob_key;

-- name: layout_by_pk
-- What the rendition job needs to read an instance's frames (the columns of retrieve.sql's instance_layout).
SELECT i.instance_pk, i.sop_instance_uid, i.transfer_syntax_uid, i.blob_key, i.size_bytes, i.sha256, i.pixel, i.bulk,
       i.number_of_frames, i.rows, i.columns, i.bits_allocated, se.series_uid, st.study_uid
FROM instances i JOIN series se USING (series_pk) JOIN studies st ON st.study_pk = i.study_pk
WHERE i.instance_pk = $1;

-- name: key_present
SELECT blob_key FROM renditions WHERE blob_key = ANY($1::text[]);

-- name: missing_in_series
-- The next images of series $1 (instance_pk after $3, at most $4) without a rendition in syntax $2 and not stored in
-- it: what the series' rendition job makes. With the Image Pixel values the encoder needs (PS3.3 C.7.6.3), read
-- from the stored metadata like retrieve.sql's instance_attributes, so that no image costs a query of its own.
SELECT i.instance_pk, i.sop_instance_uid, i.transfer_syntax_uid, i.blob_key, i.size_bytes, i.sha256, i.pixel, i.bulk,
       i.number_of_frames, i.rows, i.columns, i.bits_allocated, se.series_uid, st.study_uid,
       m -> '00280002' -> 'Value' ->> 0 AS samples_per_pixel,
       m -> '00280101' -> 'Value' ->> 0 AS bits_stored,
       m -> '00280103' -> 'Value' ->> 0 AS pixel_representation,
       m -> '00280004' -> 'Value' ->> 0 AS photometric_interpretation,
       m -> '00280006' -> 'Value' ->> 0 AS planar_configuration,
       m -> '7FE00010' ->> 'vr' AS vr
FROM instances i JOIN series se USING (series_pk) JOIN studies st ON st.study_pk = i.study_pk,
     LATERAL (SELECT i.metadata::jsonb AS m) AS meta
WHERE i.series_pk = $1 AND i.instance_pk > $3 AND i.transfer_syntax_uid <> $2 AND i.pixel IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM renditions r WHERE r.instance_pk = i.instance_pk AND r.transfer_syntax_uid = $2)
ORDER BY i.instance_pk
LIMIT $4;

-- name: insert_many
-- `insert` for a batch of renditions of one syntax ($1), each recorded only while its instance still holds the
-- bytes it was made from (FOR SHARE, as in `insert`); returns the keys recorded.
INSERT INTO renditions (instance_pk, transfer_syntax_uid, source_sha256, blob_key, size_bytes, sha256, frames, codec)
SELECT s.instance_pk, $1, s.source_sha256, s.blob_key, s.size_bytes, s.sha256, s.frames::jsonb, $2
FROM (
    SELECT i.instance_pk, n.source_sha256, n.blob_key, n.size_bytes, n.sha256, n.frames
    FROM unnest($3::bigint[], $4::text[], $5::text[], $6::bigint[], $7::text[], $8::text[])
         AS n(instance_pk, source_sha256, blob_key, size_bytes, sha256, frames)
    JOIN instances i ON i.instance_pk = n.instance_pk AND i.sha256 = n.source_sha256
    FOR SHARE OF i
) AS s
ON CONFLICT (instance_pk, transfer_syntax_uid) DO NOTHING
RETURNING blob_key;
