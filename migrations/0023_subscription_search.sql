-- FHIR Subscriptions became searchable (fhir/searchindex.py PARAMS): those already stored have no search rows.
-- fhir.reindex (fhir/reindex.py) computes them with the same code as every write.
INSERT INTO jobs (kind, payload, dedupe_key)
SELECT 'fhir.reindex', '{"type": "Subscription"}'::jsonb, 'Subscription'
WHERE EXISTS (SELECT 1 FROM fhir_resources WHERE resource_type = 'Subscription' AND NOT deleted)
ON CONFLICT DO NOTHING;
