-- Versioned FHIR resources (fhir/repository.py); tables in migrations/0007_fhir.sql, the filing of each version
-- in migrations/0013_fhir_history_filing.sql.

-- name: read
SELECT resource_type, id, version, last_updated, deleted, content, patient_key, modalities, source_key
FROM fhir_resources WHERE resource_type = $1 AND id = $2;

-- name: read_for_update
SELECT resource_type, id, version, last_updated, deleted, content, patient_key, modalities, source_key
FROM fhir_resources WHERE resource_type = $1 AND id = $2 FOR UPDATE;

-- name: read_by_source
SELECT resource_type, id, version, last_updated, deleted, content, patient_key, modalities, source_key
FROM fhir_resources WHERE resource_type = $1 AND source_key = $2;

-- name: vread
-- One version, with the filing it was written under (a natural key never changes: the current row's).
SELECT h.resource_type, h.id, h.version, h.last_updated, h.method = 'DELETE' AS deleted, h.content,
       h.patient_key, h.modalities, r.source_key
FROM fhir_history h JOIN fhir_resources r USING (resource_type, id)
WHERE h.resource_type = $1 AND h.id = $2 AND h.version = $3;

-- name: history
-- Newest first (R4 3.1.0.10: history is sorted with oldest versions last); $3: _since (NULL: all), $4: limit.
SELECT h.resource_type, h.id, h.version, h.last_updated, h.method, h.content, h.patient_key, h.modalities,
       r.source_key
FROM fhir_history h JOIN fhir_resources r USING (resource_type, id)
WHERE h.resource_type = $1 AND h.id = $2 AND ($3::timestamptz IS NULL OR h.last_updated >= $3)
ORDER BY h.version DESC
LIMIT $4;

-- name: history_filings
-- Every version's number and filing, newest first, without content: what the policy decides each version on.
SELECT h.version, h.patient_key, h.modalities, r.source_key
FROM fhir_history h JOIN fhir_resources r USING (resource_type, id)
WHERE h.resource_type = $1 AND h.id = $2 AND ($3::timestamptz IS NULL OR h.last_updated >= $3)
ORDER BY h.version DESC;

-- name: versions
-- The versions numbered $3, newest first.
SELECT h.resource_type, h.id, h.version, h.last_updated, h.method, h.content, h.patient_key, h.modalities,
       r.source_key
FROM fhir_history h JOIN fhir_resources r USING (resource_type, id)
WHERE h.resource_type = $1 AND h.id = $2 AND h.version = ANY($3::integer[])
ORDER BY h.version DESC;

-- name: insert
-- A new resource; NULL when the id is taken (the caller decides whether that is an update or a conflict).
INSERT INTO fhir_resources (resource_type, id, version, last_updated, content, patient_key, modalities, source_key)
VALUES ($1, $2, 1, $3, $4::jsonb, $5, $6::text[], $7)
ON CONFLICT (resource_type, id) DO NOTHING
RETURNING version;

-- name: replace
UPDATE fhir_resources
SET version = $3, last_updated = $4, deleted = $5, content = $6::jsonb, patient_key = $7, modalities = $8::text[],
    source_key = $9
WHERE resource_type = $1 AND id = $2;

-- name: insert_history
INSERT INTO fhir_history (resource_type, id, version, last_updated, method, content, patient_key, modalities)
VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8::text[]);

-- name: clear_search
DELETE FROM fhir_search WHERE resource_type = $1 AND id = $2;

-- name: insert_search
INSERT INTO fhir_search (resource_type, id, param, system, code, text_value, low, high, number)
SELECT $1, $2, e.param, e.system, e.code, e.text_value, e.low, e.high, e.number
FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::timestamptz[], $8::timestamptz[], $9::numeric[])
    AS e(param, system, code, text_value, low, high, number);

-- name: current_page
-- Current resources of one type after an id, locked (fhir.reindex recomputes their search rows).
SELECT id, content FROM fhir_resources
WHERE resource_type = $1 AND id > $2 AND NOT deleted
ORDER BY id
LIMIT $3
FOR UPDATE;

-- name: patient_key_of
-- The DICOM Patient ID of a Patient resource (to file a resource that references it under that patient).
SELECT patient_key FROM fhir_resources WHERE resource_type = 'Patient' AND id = $1 AND NOT deleted;
