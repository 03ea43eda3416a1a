-- Named queries for ingest (STOW-RS, import, later DIMSE C-STORE). Loaded once by dicomweb/index/repository.py.

-- name: find_instance
-- original_sha256: the client's bytes when storage compression re-encoded them (dicomweb/compress.py).
SELECT instance_pk, sha256, blob_key, study_pk, series_pk, pixel ->> 'original_sha256' AS original_sha256
FROM instances WHERE sop_instance_uid = $1;

-- name: index_instances
-- The study, series and instance rows of a batch of instances (one group-committed ingest transaction) in one
-- round trip; one output row per input row, in input order ($42 numbers the rows). A study or series already
-- indexed is only read: no row lock, so concurrent stores into one series do not queue behind each other's commits
-- (they did while every instance touched the study's and series' updated_at: 50 ms per index transaction under
-- STOW-RS load, benchmarks/ingest_cost.py). The first row of a study or series not yet indexed inserts it with its
-- attributes (DISTINCT ON: ON CONFLICT DO UPDATE may not touch one row twice in a statement); a concurrent
-- transaction inserting it too meets this one in ON CONFLICT, where the second waits for the first to commit and
-- takes its row (DO UPDATE returns it, which DO NOTHING would not). Rows are inserted in UID order, so two batches
-- lock the same keys in the same order. The instances' foreign keys hold the study and series rows (KEY SHARE,
-- which inserts share) against a concurrent delete.
-- Per row, as when the instances are indexed one after another: series_study_pk differs from study_pk when the
-- series belongs to another study, and study_patient_id/study_issuer are the patient the study is filed under (its
-- first instance's, PS3.3 A.1.2: a study is of one patient; a study's patient is never updated, so reading it
-- without a row lock is enough); an instance in conflict so is not inserted. instance_pk is NULL when the SOP
-- Instance UID is already indexed, by an earlier row of the batch too (ON CONFLICT DO NOTHING; of the rows of a
-- UID, the first not in conflict inserts). study_created and series_created say that this row inserted the study or series (the caller that
-- refuses such a row cannot trust what the later rows were told).
WITH input AS (
    SELECT t.*,
        ord = min(ord) OVER (PARTITION BY study_uid) AS study_first,
        ord = min(ord) OVER (PARTITION BY series_uid) AS series_first
    FROM unnest(
        $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[],
        $10::text[], $11::text[], $12::text[], $13::text[], $14::text[], $15::text[], $16::text[], $17::text[],
        $18::integer[], $19::text[], $20::text[], $21::text[], $22::text[], $23::text[], $24::text[], $25::text[],
        $26::text[], $27::text[], $28::integer[], $29::text[], $30::integer[], $31::integer[], $32::integer[],
        $33::integer[], $34::text[], $35::bigint[], $36::text[], $37::text[], $38::text[], $39::text[], $40::text[],
        $41::text[], $42::integer[]
    ) AS t(
        study_uid, patient_id, issuer_of_patient_id, patient_name, patient_name_search, patient_birth_date,
        patient_sex, study_date, study_time, accession_number, study_id, study_description, referring_physician_name,
        referring_physician_search, study_attrs, series_uid, modality, series_number, series_description,
        body_part_examined, series_date, series_time, pps_start_date, pps_start_time, series_attrs,
        sop_instance_uid, sop_class_uid, instance_number, transfer_syntax_uid, rows, columns, number_of_frames,
        bits_allocated, blob_key, size_bytes, sha256, metadata, bulk, pixel, patient_name_groups,
        referring_physician_groups, ord)
), st_found AS (
    SELECT study_pk, study_uid, patient_id, issuer_of_patient_id FROM studies
    WHERE study_uid IN (SELECT study_uid FROM input)
), st_new AS (
    INSERT INTO studies (
        study_uid, patient_id, issuer_of_patient_id, patient_name, patient_name_search, patient_birth_date,
        patient_sex, study_date, study_time, accession_number, study_id, study_description,
        referring_physician_name, referring_physician_search, attrs, patient_name_groups,
        referring_physician_groups)
    SELECT study_uid, patient_id, issuer_of_patient_id, patient_name, patient_name_search, patient_birth_date,
        patient_sex, study_date, study_time, accession_number, study_id, study_description,
        referring_physician_name, referring_physician_search, study_attrs::jsonb,
        CASE WHEN patient_name_groups IS NOT NULL
            THEN ARRAY(SELECT jsonb_array_elements_text(patient_name_groups::jsonb)) END,
        CASE WHEN referring_physician_groups IS NOT NULL
            THEN ARRAY(SELECT jsonb_array_elements_text(referring_physician_groups::jsonb)) END
    FROM input
    WHERE study_first AND study_uid NOT IN (SELECT study_uid FROM st_found)
    ORDER BY study_uid
    ON CONFLICT (study_uid) DO UPDATE SET updated_at = now()
    RETURNING study_pk, study_uid, patient_id, issuer_of_patient_id
), st AS (
    SELECT study_pk, study_uid, patient_id, issuer_of_patient_id, false AS created FROM st_found
    UNION ALL SELECT study_pk, study_uid, patient_id, issuer_of_patient_id, true FROM st_new
), se_found AS (
    SELECT series_pk, series_uid, study_pk FROM series WHERE series_uid IN (SELECT series_uid FROM input)
), se_new AS (
    INSERT INTO series (
        study_pk, series_uid, modality, series_number, series_description, body_part_examined, series_date,
        series_time, pps_start_date, pps_start_time, attrs)
    SELECT st.study_pk, i.series_uid, i.modality, i.series_number, i.series_description, i.body_part_examined,
        i.series_date, i.series_time, i.pps_start_date, i.pps_start_time, i.series_attrs::jsonb
    FROM input i JOIN st USING (study_uid)
    WHERE i.series_first AND i.series_uid NOT IN (SELECT series_uid FROM se_found)
    ORDER BY i.series_uid
    ON CONFLICT (series_uid) DO UPDATE SET updated_at = now()
    RETURNING series_pk, series_uid, study_pk
), se AS (
    SELECT series_pk, series_uid, study_pk, false AS created FROM se_found
    UNION ALL SELECT series_pk, series_uid, study_pk, true FROM se_new
), facts AS (
    SELECT i.ord, i.sop_instance_uid, st.study_pk, se.series_pk, se.study_pk AS series_study_pk,
        st.patient_id AS study_patient_id, st.issuer_of_patient_id AS study_issuer,
        st.created AND i.study_first AS study_created, se.created AND i.series_first AS series_created,
        se.study_pk = st.study_pk AND st.patient_id IS NOT DISTINCT FROM i.patient_id
            AND st.issuer_of_patient_id IS NOT DISTINCT FROM i.issuer_of_patient_id AS fits
    FROM input i JOIN st USING (study_uid) JOIN se USING (series_uid)
), inserting AS (
    SELECT *, ord = min(ord) FILTER (WHERE fits) OVER (PARTITION BY sop_instance_uid) AS inserts FROM facts
), ins AS (
    INSERT INTO instances (
        series_pk, study_pk, sop_instance_uid, sop_class_uid, instance_number, transfer_syntax_uid, rows, columns,
        number_of_frames, bits_allocated, blob_key, size_bytes, sha256, metadata, bulk, pixel)
    SELECT f.series_pk, f.study_pk, i.sop_instance_uid, i.sop_class_uid, i.instance_number, i.transfer_syntax_uid,
        i.rows, i.columns, i.number_of_frames, i.bits_allocated, i.blob_key, i.size_bytes, i.sha256, i.metadata,
        i.bulk::jsonb, i.pixel::jsonb
    FROM input i JOIN inserting f USING (ord)
    WHERE f.inserts
    ORDER BY i.sop_instance_uid
    ON CONFLICT (sop_instance_uid) DO NOTHING
    RETURNING instance_pk, sop_instance_uid
)
SELECT f.ord, f.study_pk, f.series_pk, f.series_study_pk, f.study_patient_id, f.study_issuer, f.study_created,
    f.series_created, CASE WHEN f.inserts THEN ins.instance_pk END AS instance_pk
FROM inserting f LEFT JOIN ins USING (sop_instance_uid)
ORDER BY f.ord;

-- name: index_instance
-- index_instances for a batch of one (a lone instance: C-STORE on one association, an import), with the same
-- answers for its one row (it may insert the instance in conflict: the caller rolls back); cheaper to plan and run
-- than the batch form's window functions and joins, for a lone instance's latency.
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

-- name: intake_reserve
-- A C-STORE checked before its answer against the index and the processes' acknowledged instances, and reserved
-- for slot $1 (NULL: check only) when nothing contradicts it (migrations/0025_intake_reservations.sql).
SELECT conflict, study_patient_id, study_issuer, reservation FROM intake_reserve($1, $2, $3, $4, $5, $6, $7, $8);

-- name: intake_unreserve
DELETE FROM intake_reservations WHERE id = ANY($1::bigint[]);

-- name: intake_unreserve_slots
-- The reservations of slots whose process is gone (its replacement, or the primary taking the slot over, starts).
DELETE FROM intake_reservations WHERE slot = ANY($1::int[]);
