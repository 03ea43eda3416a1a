-- Named queries for searching and exporting the audit trail (authz/auditquery.py; migrations/0004_audit.sql and
-- 0006_audit_search.sql). Parameters shared by the searches:
--   $1  jsonpath text over the record, or NULL for no condition on the record
--   $2  recorded at or after (timestamptz), $3 recorded before (timestamptz): the hull of the time windows
--   $4, $5  when the time condition is a union of several windows: their starts and ends (timestamptz[], same
--           length; empty arrays when the hull is the whole condition)
--   $6  true: only requests without an authenticated user (the partial index audit_log_anonymous)
-- The caller runs them after `custom_plans` in the same transaction: every condition is then planned with its
-- actual value (a NULL folds its condition away), never with a generic plan that would have to serve both a rare
-- agent and "every success". PostgreSQL has no statistics for `@@` on jsonb (it assumes 1% of the rows match), so
-- with a record condition the order is by `recorded_at + interval '0 s'`, which the (recorded_at, seq) btree cannot
-- provide: the GIN index finds the matches and they are sorted. Otherwise a page could be planned as a walk back
-- through the btree until enough rows match, which for a rare agent reads the whole trail; the planner chose that
-- in one of eight runs of tests/test_audit_api.py::test_searches_use_the_indexes, on sampling noise alone.
-- Without a record condition, `CASE` folds to `recorded_at` and the btree gives the order.

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
ORDER BY CASE WHEN $1::text IS NULL THEN recorded_at ELSE recorded_at + interval '0 s' END DESC, seq DESC
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
ORDER BY CASE WHEN $1::text IS NULL THEN recorded_at ELSE recorded_at + interval '0 s' END, seq
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
