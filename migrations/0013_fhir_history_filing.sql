-- Every FHIR version keeps the filing it was written with (the DICOM Patient ID and the modalities the policy
-- decides on; fhir/repository.py Filing), so that vread and history are decided on the patient a version belonged
-- to rather than on where the resource is filed now: a report moved from one patient to another keeps its earlier
-- versions under the earlier patient. The natural key (source_key) never changes: it stays on fhir_resources.
ALTER TABLE fhir_history
    ADD COLUMN patient_key text,
    ADD COLUMN modalities  text[] NOT NULL DEFAULT '{}';

-- Versions written before this column: the current version's filing is known exactly, and is the starting point
-- for every version of the resource.
UPDATE fhir_history h
SET patient_key = r.patient_key, modalities = r.modalities
FROM fhir_resources r
WHERE r.resource_type = h.resource_type AND r.id = h.id;

-- An earlier version of an ImagingStudy or a DiagnosticReport is filed from its own content, as its writer files
-- it (fhir/sync.py, fhir/reports.py): its subject Patient's DICOM Patient ID ...
UPDATE fhir_history h
SET patient_key = p.patient_key
FROM fhir_resources r, fhir_resources p
WHERE r.resource_type = h.resource_type AND r.id = h.id AND h.version <> r.version AND h.content IS NOT NULL
  AND h.resource_type IN ('ImagingStudy', 'DiagnosticReport')
  AND p.resource_type = 'Patient' AND 'Patient/' || p.id = h.content -> 'subject' ->> 'reference';

-- ... an ImagingStudy's modalities ...
UPDATE fhir_history h
SET modalities = ARRAY(
    SELECT DISTINCT m ->> 'code' FROM jsonb_array_elements(h.content -> 'modality') m
    WHERE m ->> 'code' IS NOT NULL ORDER BY 1)
FROM fhir_resources r
WHERE r.resource_type = h.resource_type AND r.id = h.id AND h.version <> r.version
  AND h.resource_type = 'ImagingStudy' AND jsonb_typeof(h.content -> 'modality') = 'array';

-- ... and a report's, those of the studies it references.
UPDATE fhir_history h
SET modalities = ARRAY(
    SELECT DISTINCT m
    FROM jsonb_array_elements(h.content -> 'imagingStudy') ref
    JOIN fhir_resources s ON s.resource_type = 'ImagingStudy' AND 'ImagingStudy/' || s.id = ref ->> 'reference'
    CROSS JOIN unnest(s.modalities) m
    ORDER BY 1)
FROM fhir_resources r
WHERE r.resource_type = h.resource_type AND r.id = h.id AND h.version <> r.version
  AND h.resource_type = 'DiagnosticReport' AND jsonb_typeof(h.content -> 'imagingStudy') = 'array';

-- A deletion is filed where the version it deleted was (as fhir/repository.py files deletions).
UPDATE fhir_history h
SET patient_key = before.patient_key, modalities = before.modalities
FROM fhir_history before
WHERE h.method = 'DELETE' AND before.resource_type = h.resource_type AND before.id = h.id
  AND before.version = h.version - 1;
