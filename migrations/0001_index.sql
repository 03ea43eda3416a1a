-- The DICOM index: one row per study, series and instance, with the attributes QIDO-RS matches on as columns
-- (each with the index its query needs) and the attributes it returns as DICOM JSON.
-- Dates and times are kept as normalized DICOM strings (YYYYMMDD, HHMMSS.FFFFFF): they order as text.
CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE studies (
    study_pk                 bigserial PRIMARY KEY,
    study_uid                text NOT NULL UNIQUE,
    patient_id               text,
    issuer_of_patient_id     text,
    patient_name             text,
    patient_name_search      text,   -- upper case, components separated by single spaces
    patient_birth_date       text,
    patient_sex              text,
    study_date               text,
    study_time               text,
    accession_number         text,
    study_id                 text,
    study_description        text,
    referring_physician_name text,
    referring_physician_search text,
    attrs                    jsonb NOT NULL,  -- patient and study level attributes, DICOM JSON object
    created_at               timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX studies_patient_id ON studies (patient_id);
CREATE INDEX studies_patient_name ON studies (patient_name_search text_pattern_ops);
CREATE INDEX studies_patient_name_trgm ON studies USING gin (patient_name_search gin_trgm_ops);
CREATE INDEX studies_study_date ON studies (study_date, study_time);
CREATE INDEX studies_accession ON studies (accession_number);
CREATE INDEX studies_study_id ON studies (study_id);
CREATE INDEX studies_updated ON studies (updated_at DESC);
CREATE INDEX studies_description ON studies USING gin (upper(study_description) gin_trgm_ops);

CREATE TABLE series (
    series_pk            bigserial PRIMARY KEY,
    study_pk             bigint NOT NULL REFERENCES studies ON DELETE CASCADE,
    series_uid           text NOT NULL UNIQUE,
    modality             text,
    series_number        integer,
    series_description   text,
    body_part_examined   text,
    series_date          text,
    series_time          text,
    pps_start_date       text,
    pps_start_time       text,
    attrs                jsonb NOT NULL,  -- series level attributes, DICOM JSON object
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX series_study ON series (study_pk, series_number);
CREATE INDEX series_modality ON series (modality, study_pk);
CREATE INDEX series_pps_date ON series (pps_start_date);

CREATE TABLE instances (
    instance_pk          bigserial PRIMARY KEY,
    series_pk            bigint NOT NULL REFERENCES series ON DELETE CASCADE,
    study_pk             bigint NOT NULL REFERENCES studies ON DELETE CASCADE,
    sop_instance_uid     text NOT NULL UNIQUE,
    sop_class_uid        text NOT NULL,
    instance_number      integer,
    transfer_syntax_uid  text NOT NULL,
    rows                 integer,
    columns              integer,
    number_of_frames     integer,
    bits_allocated       integer,
    blob_key             text NOT NULL UNIQUE,
    size_bytes           bigint NOT NULL,
    sha256               text NOT NULL,
    -- The whole data set as DICOM JSON text with BulkDataURI for large binary values, made at ingest so that
    -- metadata requests never read DICOM files (PS3.18 10.4.1.1.2). Kept as text: responses concatenate it.
    metadata             text NOT NULL,
    -- Where each bulk data element's value lies in the blob: {"7FE00010": [offset, length], ...}.
    bulk                 jsonb NOT NULL DEFAULT '{}',
    -- Where each frame's bytes lie in the blob (see dicomweb/pixels.py for the shape).
    pixel                jsonb,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX instances_series ON instances (series_pk, instance_number);
CREATE INDEX instances_study ON instances (study_pk);
CREATE INDEX instances_sop_class ON instances (sop_class_uid);
