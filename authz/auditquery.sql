-- Named queries for searching and exporting the audit trail (authz/auditquery.py; migrations/0004_audit.sql and
-- 0006_audit_search.sql). Parameters shared by the searches:
--   $1  jsonpath text over the record, or NULL for no condition on the record
--   $2  recorded at or after (timestamptz), $3 recorded before (timestamptz): the hull of the time windows
--   $4, $5  when the time condition is a union of several windows: their starts and ends (timestamptz[], same
--           length; empty arrays when the hull is the whole condition)
--   $6  true: only requests without an authenticated user (the partial index audit_log_anonymous)
-- The caller runs them after `custom_plans` in the same transaction: every condition is then planned with its
-- actual value (a NULL folds its condition away; the GIN and btree indexes are chosen by the real
-- selectivity), never with a generic plan that would have to serve both a rare agent and "every success".

-- name: custom_plans
SET LOCAL plan_cache_mode = force_custom_plan;

-- name: search_desc
-- Newest first (by recorded time, then seq): after the record at seq $7 (NULL: from the start), at most $8 rows.
SELECT seq, recorded_at, record::text AS record
FROM audit_log
WHERE ($1::text IS NULL OR record @@ $1::text::jsonpath)
  AND recorded_at >= $2 AND recorded_at < $3
  AND (cardinality($4::timestamptz[]) = 0 OR EXISTS (
      SELECT 1 FROM unnest($4::timestamptz[], $5::timestamptz[]) AS w(lo, hi)
      WHERE recorded_at >= w.lo AND recorded_at < w.hi))
  AND ($6::boolean IS NOT TRUE OR NOT (record->'agent' ? 'sub'))
  AND ($7::bigint IS NULL OR (recorded_at, seq) < (SELECT a.recorded_at, a.seq FROM audit_log a WHERE a.seq = $7))
ORDER BY recorded_at DESC, seq DESC
LIMIT $8;

-- name: search_asc
-- Oldest first (by recorded time, then seq): after the record at seq $7 (NULL: from the start), at most $8 rows.
SELECT seq, recorded_at, record::text AS record
FROM audit_log
WHERE ($1::text IS NULL OR record @@ $1::text::jsonpath)
  AND recorded_at >= $2 AND recorded_at < $3
  AND (cardinality($4::timestamptz[]) = 0 OR EXISTS (
      SELECT 1 FROM unnest($4::timestamptz[], $5::timestamptz[]) AS w(lo, hi)
      WHERE recorded_at >= w.lo AND recorded_at < w.hi))
  AND ($6::boolean IS NOT TRUE OR NOT (record->'agent' ? 'sub'))
  AND ($7::bigint IS NULL OR (recorded_at, seq) > (SELECT a.recorded_at, a.seq FROM audit_log a WHERE a.seq = $7))
ORDER BY recorded_at, seq
LIMIT $8;

-- name: count
SELECT count(*)
FROM audit_log
WHERE ($1::text IS NULL OR record @@ $1::text::jsonpath)
  AND recorded_at >= $2 AND recorded_at < $3
  AND (cardinality($4::timestamptz[]) = 0 OR EXISTS (
      SELECT 1 FROM unnest($4::timestamptz[], $5::timestamptz[]) AS w(lo, hi)
      WHERE recorded_at >= w.lo AND recorded_at < w.hi))
  AND ($6::boolean IS NOT TRUE OR NOT (record->'agent' ? 'sub'));

-- name: export
-- Every match in chain order, for a cursor.
SELECT seq, recorded_at, record::text AS record
FROM audit_log
WHERE ($1::text IS NULL OR record @@ $1::text::jsonpath)
  AND recorded_at >= $2 AND recorded_at < $3
  AND (cardinality($4::timestamptz[]) = 0 OR EXISTS (
      SELECT 1 FROM unnest($4::timestamptz[], $5::timestamptz[]) AS w(lo, hi)
      WHERE recorded_at >= w.lo AND recorded_at < w.hi))
  AND ($6::boolean IS NOT TRUE OR NOT (record->'agent' ? 'sub'))
ORDER BY seq;

-- name: read
SELECT seq, recorded_at, record::text AS record FROM audit_log WHERE seq = $1;
