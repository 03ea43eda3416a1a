-- FHIR R4 resources (issue 4): the current version of every resource, its history, and a search index.
--
-- ImagingStudy, Patient and Endpoint are derived from the DICOM index by the `fhir.sync` job; DiagnosticReport
-- is written by clients. Every change is a new version (R4 3.1.0.3 "vread", 3.1.0.10 "history").

CREATE TABLE fhir_resources (
    resource_type  text        NOT NULL,
    id             text        NOT NULL,
    version        integer     NOT NULL,
    last_updated   timestamptz NOT NULL,
    deleted        boolean     NOT NULL DEFAULT false,
    content        jsonb,                 -- the current version (NULL once deleted)
    -- The DICOM Patient ID the resource belongs to (policy constraints: care lists, consent, patient context);
    -- NULL for resources of no patient (Endpoint).
    patient_key    text,
    -- Modalities of the imaging the resource is about (policy constraints by modality).
    modalities     text[]      NOT NULL DEFAULT '{}',
    -- The natural key of a derived resource (ImagingStudy: its StudyInstanceUID; Patient: issuer|PatientID).
    source_key     text,
    PRIMARY KEY (resource_type, id)
);
CREATE UNIQUE INDEX fhir_resources_source ON fhir_resources (resource_type, source_key) WHERE source_key IS NOT NULL;
CREATE INDEX fhir_resources_updated ON fhir_resources (resource_type, last_updated);
CREATE INDEX fhir_resources_patient ON fhir_resources (patient_key);

CREATE TABLE fhir_history (
    resource_type  text        NOT NULL,
    id             text        NOT NULL,
    version        integer     NOT NULL,
    last_updated   timestamptz NOT NULL,
    method         text        NOT NULL CHECK (method IN ('POST', 'PUT', 'DELETE')),
    content        jsonb,                 -- NULL for a deletion
    PRIMARY KEY (resource_type, id, version)
);
CREATE INDEX fhir_history_updated ON fhir_history (last_updated);

-- One row per search parameter value of the current version (R4 3.1.1.4 search parameter types). Rows of a
-- resource are replaced on every write, in the write's transaction.
CREATE TABLE fhir_search (
    resource_type  text        NOT NULL,
    id             text        NOT NULL,
    param          text        NOT NULL,
    system         text,                  -- token: system (NULL when none)
    code           text,                  -- token: code; reference: "Type/id" or an absolute URL; uri
    text_value     text,                  -- string: normalized (lower case, no accents); token: display text
    low            timestamptz,           -- date: the start of the value's period
    high           timestamptz,           -- date: the end of the value's period
    number         numeric,
    FOREIGN KEY (resource_type, id) REFERENCES fhir_resources ON DELETE CASCADE
);
CREATE INDEX fhir_search_resource ON fhir_search (resource_type, id);
CREATE INDEX fhir_search_token ON fhir_search (resource_type, param, code, system);
CREATE INDEX fhir_search_text ON fhir_search (resource_type, param, text_value text_pattern_ops);
CREATE INDEX fhir_search_date ON fhir_search (resource_type, param, low, high);
