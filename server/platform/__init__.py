"""The ground every package stands on: the database pool and named SQL (`db`), the job queue (`jobs`), the
embedded PostgreSQL's supervision (`dbwatch`), private files (`private`), logging without PHI (`logs`),
telemetry, the free-space watermark (`diskspace`), HTTP connection limits and deadlines (`connections`),
requests in flight (`inflight`) and the HTTP errors every package answers alike (`http`). It imports none of
the domain packages (dicomweb, fhir, authz, inference) and nothing else of `server`; they may import it."""
