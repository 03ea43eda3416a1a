-- QIDO-RS (PS3.18 10.6): named queries and fragments, composed by dicomweb/index/search.py.
-- Placeholders in braces are filled only with other fragments of this file, the whitelisted column expressions
-- of search.py and parameter numbers ($n): request values always travel as parameters. Every block goes
-- through str.format, so literal braces are doubled.
-- Each page query selects one page of keys first (index-backed WHERE, ORDER BY and LIMIT), and only then
-- reads the returned rows' attributes; computed attributes come from study_computed (joined to the study page
-- itself) or the *_stats queries for the page's distinct studies and series.

-- name: studies
-- The page of studies with their computed attributes (as study_stats computes them), in one round trip.
SELECT p.study_pk, p.study_uid, p.study_attrs, se.n AS series_count, se.modalities, i.n AS instance_count,
       i.sop_classes
FROM (
    SELECT st.study_pk, st.study_uid, st.attrs::text AS study_attrs, st.study_date, st.study_time
    FROM studies st
    WHERE {where}
    ORDER BY st.study_date DESC NULLS LAST, st.study_time DESC NULLS LAST, st.study_pk DESC
    LIMIT {limit} OFFSET {offset}
) p
{computed}
ORDER BY p.study_date DESC NULLS LAST, p.study_time DESC NULLS LAST, p.study_pk DESC;

-- name: series
SELECT p.series_pk, p.series_uid, p.series_attrs, st.study_pk, st.study_uid, st.attrs::text AS study_attrs
FROM (
    SELECT se.series_pk, se.study_pk, se.series_uid, se.series_number, se.attrs::text AS series_attrs
    FROM series se {joins}
    WHERE {where}
    ORDER BY se.study_pk, se.series_number, se.series_pk
    LIMIT {limit} OFFSET {offset}
) p
JOIN studies st ON st.study_pk = p.study_pk
ORDER BY p.study_pk, p.series_number, p.series_pk;

-- name: instances
SELECT i.sop_instance_uid, {metadata} AS metadata,
       se.series_pk, se.series_uid, se.attrs::text AS series_attrs,
       st.study_pk, st.study_uid, st.attrs::text AS study_attrs
FROM (
    SELECT i.instance_pk, i.series_pk, i.study_pk, i.instance_number
    FROM instances i {joins}
    WHERE {where}
    ORDER BY i.series_pk, i.instance_number, i.instance_pk
    LIMIT {limit} OFFSET {offset}
) p
JOIN instances i ON i.instance_pk = p.instance_pk
JOIN series se ON se.series_pk = p.series_pk
JOIN studies st ON st.study_pk = p.study_pk
ORDER BY p.series_pk, p.instance_number, p.instance_pk;

-- name: metadata_all
i.metadata;

-- name: metadata_pick
-- Only the wanted top-level elements of the instance's DICOM JSON, parsed by the database.
(SELECT jsonb_object_agg(e.key, e.value) FROM jsonb_each(i.metadata::jsonb) e WHERE e.key = ANY({keys}))::text;

-- name: study_stats
-- Computed study attributes (PS3.18 10.6.3.3.1) for a page's studies: one index-only pass over each study's
-- series (series_modality) and one over its instances (instances_study_sop_class).
SELECT s.study_pk, se.n AS series_count, se.modalities, i.n AS instance_count, i.sop_classes
FROM unnest($1::bigint[]) AS s(study_pk)
{computed};

-- name: study_computed
-- The computed attributes of the study whose key is the column {pk} (joined after it): series count and
-- modalities (se), instance count and SOP classes (i). Used by the study page and by study_stats.
CROSS JOIN LATERAL (
    SELECT count(*) AS n,
           coalesce(array_agg(DISTINCT c.modality ORDER BY c.modality) FILTER (WHERE c.modality IS NOT NULL),
                    '{{}}') AS modalities
    FROM series c WHERE c.study_pk = {pk}
) se
CROSS JOIN LATERAL (
    SELECT count(*) AS n, coalesce(array_agg(DISTINCT c.sop_class_uid ORDER BY c.sop_class_uid), '{{}}') AS sop_classes
    FROM instances c WHERE c.study_pk = {pk}
) i;

-- name: series_stats
SELECT s.series_pk, (SELECT count(*) FROM instances c WHERE c.series_pk = s.series_pk) AS instance_count
FROM unnest($1::bigint[]) AS s(series_pk);

-- name: join_study_of_series
JOIN studies st ON st.study_pk = se.study_pk;

-- name: join_series_of_instance
JOIN series se ON se.series_pk = i.series_pk;

-- name: join_study_of_instance
JOIN studies st ON st.study_pk = i.study_pk;

-- name: exists_series_of_study
EXISTS (SELECT 1 FROM series se WHERE se.study_pk = st.study_pk AND {where});

-- name: exists_instances_of_study
EXISTS (SELECT 1 FROM instances i WHERE i.study_pk = st.study_pk AND {where});

-- name: exists_instances_of_series_of_study
EXISTS (SELECT 1 FROM series se JOIN instances i ON i.series_pk = se.series_pk
        WHERE se.study_pk = st.study_pk AND {where});

-- name: exists_instances_of_series
EXISTS (SELECT 1 FROM instances i WHERE i.series_pk = se.series_pk AND {where});

-- name: modalities_in_study
-- ModalitiesInStudy matches when any series of the study matches (PS3.4 C.6.2.1.2).
EXISTS (SELECT 1 FROM series ms WHERE ms.study_pk = {study_pk} AND {where});

-- name: sop_classes_in_study
EXISTS (SELECT 1 FROM instances mi WHERE mi.study_pk = {study_pk} AND {where});

-- name: match_all
TRUE;

-- name: match_equal
{column} = {p};

-- name: match_any
{column} = ANY({p});

-- name: match_like
{column} LIKE {p};

-- name: match_like_prefix
-- The byte-order range on a text_pattern_ops column lets the index serve the literal prefix of the pattern
-- even when the prepared statement runs with a generic plan (which cannot look inside LIKE's parameter).
({column} LIKE {p} AND {column} ~>=~ {low} AND {column} ~<~ {high});

-- name: match_like_either
({column} LIKE {p} OR {column} LIKE {q});

-- name: match_folded_like
upper({column}) LIKE upper({p});

-- name: match_between
{column} BETWEEN {low} AND {high};

-- name: match_from
{column} >= {low};

-- name: match_until
{column} <= {high};

-- name: match_contains
{column} @> {p}::jsonb;

-- name: restrict_patients
-- Access constraints from the policy: searches only ever see permitted rows, so paging and counts do too.
st.patient_id = ANY({p});

-- name: restrict_patients_excluded
(st.patient_id IS NULL OR st.patient_id <> ALL({p}));

-- name: restrict_modalities_excluded
-- A study holding any series of a restricted modality is withheld whole (its counts would reveal the rest).
NOT EXISTS (SELECT 1 FROM series rx WHERE rx.study_pk = {study_pk} AND rx.modality = ANY({p}));

-- name: restrict_or_granted
-- What the limits above let through, or any study of the patient a break-glass session grants.
(({limits}) OR st.patient_id = {patient});

-- name: restrict_or_granted_study
-- What the limits let through, or the one study of the granted patient that a break-glass session names.
(({limits}) OR (st.patient_id = {patient} AND st.study_uid = {study}));
