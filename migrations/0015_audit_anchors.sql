-- Which signed checkpoints each anchor sink holds (authz/auditanchor.py). The checkpoint job copies every
-- checkpoint not yet listed here to each configured sink (append-only file, S3 Object Lock, syslog, witness),
-- in seq order, and lists it once the sink took it: a sink that failed is retried at the next run from where it
-- stopped. Bookkeeping only: `hounsfield audit verify` reads the sinks themselves, never this table.

CREATE TABLE audit_anchored (
    sink        text NOT NULL,
    seq         bigint NOT NULL,
    anchored_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sink, seq)
);

REVOKE ALL ON audit_anchored FROM PUBLIC, hounsfield_app;
GRANT SELECT, INSERT ON audit_anchored TO hounsfield_app;
