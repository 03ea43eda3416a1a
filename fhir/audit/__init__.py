"""The audit trail for security teams as FHIR AuditEvent: the routes (`routes`) and their search (`search`)."""
