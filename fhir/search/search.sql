-- FHIR R4 search (fhir/searchsql.py): named queries and fragments over fhir_resources and fhir_search
-- (migrations/0007_fhir.sql). Placeholders in braces are filled only with other fragments of this file, the
-- table aliases and column expressions of searchsql.py, and parameter numbers ($n): request values always travel
-- as parameters. Every block goes through str.format, so literal braces are doubled.
-- Each search parameter is an EXISTS over the index rows of its (resource_type, param, ...) btree indexes; the
-- policy's constraints are conditions on the resource row itself, so counts and pages only see permitted rows.

-- name: page
SELECT r.id, r.content::text AS content
FROM fhir_resources r {joins}
WHERE r.resource_type = {rtype} AND NOT r.deleted AND {where}
ORDER BY {order}
LIMIT {limit} OFFSET {offset};

-- name: total
SELECT count(*) FROM fhir_resources r WHERE r.resource_type = {rtype} AND NOT r.deleted AND {where};

-- name: ids
SELECT r.id FROM fhir_resources r
WHERE r.resource_type = {rtype} AND NOT r.deleted AND {where}
ORDER BY r.id
LIMIT {limit};

-- name: include
-- The resources that the page's resources refer to by one reference parameter (R4 3.1.1.5.4 _include); a
-- reference on our base counts as the relative one. Keys that do not name a local `Type/id` never join.
SELECT t.resource_type, t.id, t.content::text AS content
FROM (
    SELECT DISTINCT CASE WHEN left(s.code, length({base})) = {base} THEN substr(s.code, length({base}) + 1)
                         ELSE s.code END AS key
    FROM fhir_search s
    WHERE s.resource_type = {source} AND s.param = {param} AND s.id = ANY({ids}::text[])
) k
JOIN fhir_resources t ON t.resource_type = split_part(k.key, '/', 1) AND t.id = split_part(k.key, '/', 2)
WHERE t.resource_type = {target} AND NOT t.deleted AND {where}
ORDER BY t.id
LIMIT {limit};

-- name: revinclude
-- The resources that refer to the page's resources by one reference parameter (R4 3.1.1.5.4 _revinclude).
SELECT t.resource_type, t.id, t.content::text AS content
FROM fhir_resources t
WHERE t.resource_type = {source} AND NOT t.deleted AND {where}
  AND EXISTS (SELECT 1 FROM fhir_search s
              WHERE s.resource_type = t.resource_type AND s.id = t.id AND s.param = {param}
                AND s.code = ANY({keys}::text[]))
ORDER BY t.id
LIMIT {limit};

-- name: has_value
-- A parameter with a value that satisfies {where} (alias s: the index row).
EXISTS (SELECT 1 FROM fhir_search s
        WHERE s.resource_type = {rtype} AND s.id = {alias}.id AND s.param = {param} AND ({where}));

-- name: has_no_value
NOT EXISTS (SELECT 1 FROM fhir_search s
            WHERE s.resource_type = {rtype} AND s.id = {alias}.id AND s.param = {param} AND ({where}));

-- name: chain_target
-- R4 3.1.1.4.12 chaining: the reference names a current resource of the target type that matches {where}.
s.code IN (SELECT c.resource_type || '/' || c.id FROM fhir_resources c
           WHERE c.resource_type = {target} AND NOT c.deleted AND {where});

-- name: sort_key
-- One sort key of an indexed parameter: the lowest value ascending, the highest descending (R4 3.1.1.5.5).
LEFT JOIN LATERAL (SELECT {agg}(s.{column}) AS v FROM fhir_search s
                   WHERE s.resource_type = r.resource_type AND s.id = r.id AND s.param = {param}) {key} ON TRUE;

-- name: all
TRUE;

-- name: nothing
FALSE;

-- name: equal
{column} = {p};

-- name: any
{column} = ANY({p}::text[]);

-- name: is_null
{column} IS NULL;

-- name: like_prefix
-- The byte-order range on the text_pattern_ops column lets the index serve the literal prefix even under a
-- generic plan (which cannot look inside LIKE's parameter).
({column} LIKE {p} AND {column} ~>=~ {low} AND {column} ~<~ {high});

-- name: like
{column} LIKE {p};

-- name: patients
{alias}.patient_key = ANY({p}::text[]);

-- name: patients_excluded
({alias}.patient_key IS NULL OR {alias}.patient_key <> ALL({p}::text[]));

-- name: modalities_excluded
NOT ({alias}.modalities && {p}::text[]);

-- name: owned_by
-- The resource records this writer ({p}: the owner extension's sub and issuer as a JSON document it contains).
{alias}.content @> {p}::jsonb;

-- name: limits_or_granted
-- Rows the policy's limits let through, or rows of the patient (study) a break-glass session grants.
(({limits}) OR ({granted}));

-- name: date_eq
-- Date prefixes (R4 3.1.1.4.3) on the target's period [{low}, {high}) and the search value's range [{sl}, {sh}).
({low} >= {sl} AND {high} <= {sh});

-- name: date_ne
NOT ({low} >= {sl} AND {high} <= {sh});

-- name: date_gt
{high} > {sh};

-- name: date_lt
{low} < {sl};

-- name: date_ge
({high} > {sh} OR {low} >= {sl});

-- name: date_le
({low} < {sl} OR {high} <= {sh});

-- name: date_sa
{low} >= {sh};

-- name: date_eb
{high} <= {sl};

-- name: date_ap
({low} < {sh} AND {high} > {sl});
