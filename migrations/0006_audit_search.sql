-- Searching the audit trail (GET /fhir/AuditEvent; authz/auditquery.py, authz/auditquery.sql).
--
-- A GIN index (jsonb_path_ops) on the records answers `record @@ <jsonpath>`, the jsonpath an and/or of
-- `$.path == "value"` clauses (PostgreSQL extracts each such clause as an index key; PostgreSQL docs 8.14.4):
-- who (agent.sub, agent.issuer, agent.roles), what (entity.patient_id, entity.study_uid), type and subtype,
-- outcome, action, purpose of use, the policy decision. Indexing the record itself, not a derived document,
-- keeps appends cheap (no expression to compute under the chain head lock) and rechecks fast.
--
-- Searches are ordered by recorded time (FHIR's `_sort=-date`), seq breaking ties: the btree on
-- (recorded_at, seq) serves that order, date ranges and keyset paging (appends only add at its right edge).
-- Requests without an authenticated user (`agent:missing=true`) have no indexable value to look for, hence the
-- small partial index of them.

CREATE INDEX audit_log_search ON audit_log USING gin (record jsonb_path_ops);
CREATE INDEX audit_log_recorded ON audit_log (recorded_at, seq);
CREATE INDEX audit_log_anonymous ON audit_log (recorded_at, seq) WHERE NOT (record->'agent' ? 'sub');
