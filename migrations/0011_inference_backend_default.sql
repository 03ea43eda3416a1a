-- AI models (issue 7): `backend.backend` of a registration now pins where the model runs (`in-process` or `ray`);
-- absent, the server's HOUNSFIELD_INFERENCE_BACKEND decides. Registrations stored before this change carry
-- "backend": "in-process" only because it was filled in as a default, which pinned nothing: drop it, so that
-- these models keep running wherever the server's setting sends them.
UPDATE inference_models SET backend = backend - 'backend' WHERE backend ->> 'backend' = 'in-process';
