-- Named queries for renditions (dicomweb/renditions.py; table in migrations/0008_renditions.sql).

-- name: insert
-- Only while the instance still holds the bytes the rendition was made from; FOR SHARE waits for an overwrite in
-- flight and then sees its new sha256 (READ COMMITTED re-check), so a stale rendition is never recorded.
INSERT INTO renditions (instance_pk, transfer_syntax_uid, source_sha256, blob_key, size_bytes, sha256, frames, codec)
SELECT i.instance_pk, $2, $3, $4, $5, $6, $7::jsonb, $8
FROM (SELECT instance_pk FROM instances WHERE instance_pk = $1 AND sha256 = $3 FOR SHARE) AS i
ON CONFLICT (instance_pk, transfer_syntax_uid) DO NOTHING
RETURNING blob_key;

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
