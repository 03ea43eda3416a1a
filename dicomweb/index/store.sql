-- Named queries for ingest (STOW-RS, import, later DIMSE C-STORE). Loaded once by dicomweb/index/repository.py.

-- name: find_instance
-- original_sha256: the client's bytes when storage compression re-encoded them (dicomweb/compress.py).
SELECT instance_pk, sha256, blob_key, study_pk, series_pk, pixel ->> 'original_sha256' AS original_sha256
FROM instances WHERE sop_instance_uid = $1;

-- name: index_instance
-- Study and series rows and the instance insert in one round trip. A study or series already indexed is
-- only read: no row lock, so concurrent stores into one series do not queue behind each other's commits (they
-- did while every instance touched the study's and series' updated_at: 50 ms per index transaction under
-- STOW-RS load, benchmarks/ingest_cost.py). The first instance of a study or series inserts it with its
-- attributes; two first instances at once meet in ON CONFLICT, where the second waits for the first to commit
-- and takes its row (DO UPDATE returns it, which DO NOTHING would not). The instance's foreign keys hold the
-- study and series rows (KEY SHARE, which inserts share) against a concurrent delete. series_study_pk differs
-- from study_pk when the series already belongs to another study, and study_patient_id/study_issuer are the
-- patient the study is filed under (the first instance's): when they differ from the instance's, the caller rolls
-- the transaction back (PS3.3 A.1.2: a study is of one patient). Two first instances of one study with different
-- patients meet in ON CONFLICT: the second reads the first's committed patient there (RETURNING gives the row as
-- updated, and only updated_at changes), so exactly one patient's instance is filed. A study's patient is never
-- updated, so reading it without a row lock is enough.
-- instance_pk is NULL when the SOP Instance UID is already indexed (ON CONFLICT DO NOTHING).
WITH st_found AS (
    SELECT study_pk, patient_id, issuer_of_patient_id FROM studies WHERE study_uid = $1
), st_new AS (
    INSERT INTO studies (
        study_uid, patient_id, issuer_of_patient_id, patient_name, patient_name_search, patient_birth_date,
        patient_sex, study_date, study_time, accession_number, study_id, study_description,
        referring_physician_name, referring_physician_search, attrs, patient_name_groups,
        referring_physician_groups)
    SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15::jsonb, $40::text[], $41::text[]
    WHERE NOT EXISTS (SELECT 1 FROM st_found)
    ON CONFLICT (study_uid) DO UPDATE SET updated_at = now()
    RETURNING study_pk, patient_id, issuer_of_patient_id
), st AS (
    SELECT study_pk, patient_id, issuer_of_patient_id FROM st_found
    UNION ALL SELECT study_pk, patient_id, issuer_of_patient_id FROM st_new
), se_found AS (
    SELECT series_pk, study_pk FROM series WHERE series_uid = $16
), se_new AS (
    INSERT INTO series (
        study_pk, series_uid, modality, series_number, series_description, body_part_examined, series_date,
        series_time, pps_start_date, pps_start_time, attrs)
    SELECT (SELECT study_pk FROM st), $16, $17, $18::integer, $19, $20, $21, $22, $23, $24, $25::jsonb
    WHERE NOT EXISTS (SELECT 1 FROM se_found)
    ON CONFLICT (series_uid) DO UPDATE SET updated_at = now()
    RETURNING series_pk, study_pk
), se AS (
    SELECT series_pk, study_pk FROM se_found UNION ALL SELECT series_pk, study_pk FROM se_new
), ins AS (
    INSERT INTO instances (
        series_pk, study_pk, sop_instance_uid, sop_class_uid, instance_number, transfer_syntax_uid, rows, columns,
        number_of_frames, bits_allocated, blob_key, size_bytes, sha256, metadata, bulk, pixel)
    VALUES ((SELECT series_pk FROM se), (SELECT study_pk FROM st), $26, $27, $28, $29, $30, $31, $32, $33, $34,
        $35, $36, $37, $38::jsonb, $39::jsonb)
    ON CONFLICT (sop_instance_uid) DO NOTHING
    RETURNING instance_pk
)
SELECT st.study_pk, se.series_pk, se.study_pk AS series_study_pk, (SELECT instance_pk FROM ins) AS instance_pk,
    st.patient_id AS study_patient_id, st.issuer_of_patient_id AS study_issuer
FROM st, se;

-- name: replace_instance
-- Overwrite (when configured): the row points at the new blob; the old blob is deleted by a job queued in the
-- same transaction, after the commit makes the new one visible.
UPDATE instances SET
    series_pk = $1, study_pk = $2, sop_class_uid = $4, instance_number = $5, transfer_syntax_uid = $6,
    rows = $7, columns = $8, number_of_frames = $9, bits_allocated = $10, blob_key = $11, size_bytes = $12,
    sha256 = $13, metadata = $14, bulk = $15::jsonb, pixel = $16::jsonb, updated_at = now()
WHERE sop_instance_uid = $3
RETURNING instance_pk;

-- name: lock_instance
SELECT instance_pk, sha256, blob_key, series_pk, study_pk, pixel ->> 'original_sha256' AS original_sha256
FROM instances WHERE sop_instance_uid = $1 FOR UPDATE;

-- name: blob_keys_present
-- Blobs in use: instances' and renditions' (migrations/0008_renditions.sql); the orphan sweep keeps both.
SELECT blob_key FROM instances WHERE blob_key = ANY($1::text[])
UNION ALL
SELECT blob_key FROM renditions WHERE blob_key = ANY($1::text[]);

-- name: identity
-- What a C-STORE is checked against before its answer (dicomweb/dimse/indexer.py): the patient the study is filed
-- under, the study the series belongs to, and the bytes (as the client sent them) of the SOP Instance UID.
SELECT st.study_pk IS NOT NULL AS study_known, st.patient_id, st.issuer_of_patient_id,
    se_st.study_uid AS series_study_uid,
    coalesce(i.pixel ->> 'original_sha256', i.sha256) AS instance_sha256
FROM (SELECT 1) AS one
LEFT JOIN studies st ON st.study_uid = $1
LEFT JOIN series se ON se.series_uid = $2
LEFT JOIN studies se_st ON se_st.study_pk = se.study_pk
LEFT JOIN instances i ON i.sop_instance_uid = $3;
