"""Authentication (bearer JWTs), authorization (OPA/Rego policies), break-glass and the audit trail."""
