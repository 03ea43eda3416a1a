-- The fhir.sync job (fhir/sync.py): reads the DICOM index (migrations/0001_index.sql) to derive ImagingStudy,
-- Patient and Endpoint resources (migrations/0007_fhir.sql).

-- name: lock_source
-- One writer at a time per derived resource (resource type and natural key) until the transaction ends: two jobs
-- for one study, or two studies of one new patient, never interleave their read-compare-write.
SELECT pg_advisory_xact_lock(hashtextextended('fhir.sync:' || $1 || ':' || $2, 0));

-- name: study
SELECT study_pk, study_uid, patient_id, attrs FROM studies WHERE study_uid = $1;

-- name: series_of_study
-- Series in a stable order (series number, then UID) so that an unchanged study builds identical content.
SELECT series_pk, attrs FROM series WHERE study_pk = $1 ORDER BY series_number NULLS LAST, series_uid;

-- name: instances_of_study
SELECT series_pk, sop_instance_uid, sop_class_uid, instance_number
FROM instances WHERE study_pk = $1
ORDER BY series_pk, instance_number NULLS LAST, sop_instance_uid;

-- name: studies_of_patient
-- The patient's studies, newest first: the Patient resource follows the most recently received study.
SELECT study_pk, attrs FROM studies WHERE patient_id = $1 ORDER BY study_pk DESC LIMIT $2;

-- name: studies_without_imagingstudy
-- Backfill: studies (after the cursor $1, in primary key order) that have no current ImagingStudy.
SELECT s.study_pk, s.study_uid
FROM studies s
WHERE s.study_pk > $1
  AND NOT EXISTS (
      SELECT 1 FROM fhir_resources f
      WHERE f.resource_type = 'ImagingStudy' AND f.source_key = s.study_uid AND NOT f.deleted)
ORDER BY s.study_pk
LIMIT $2;

-- name: imagingstudies_without_study
-- Backfill: current ImagingStudy resources (after the cursor $1, by natural key) whose study left the index.
SELECT f.source_key
FROM fhir_resources f
WHERE f.resource_type = 'ImagingStudy' AND NOT f.deleted AND f.source_key > $1
  AND NOT EXISTS (SELECT 1 FROM studies s WHERE s.study_uid = f.source_key)
ORDER BY f.source_key
LIMIT $2;
