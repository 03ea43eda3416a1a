-- Break-glass sessions (issue 3; authz/breakglass.py). A clinician whom the policy would deny asserts emergency
-- access with a free-text reason; the session lets the policy lift its care-list, consent and modality limits
-- for that subject (sub + issuer) until expires_at, or until a security reviewer closes it with a comment.
-- Times are the server's clock (the same clock that checks token expiry).

CREATE TABLE break_glass_sessions (
    id            uuid PRIMARY KEY,
    sub           text NOT NULL,
    issuer        text NOT NULL,
    roles         text[] NOT NULL DEFAULT '{}',
    client_id     text,
    client_ip     text,
    reason        text NOT NULL CHECK (char_length(reason) BETWEEN 1 AND 1000),
    patient_id    text,
    study_uid     text,
    started_at    timestamptz NOT NULL,
    expires_at    timestamptz NOT NULL,
    alerted_at    timestamptz,              -- when the webhook accepted the alert (null: none configured, or not yet)
    closed_at     timestamptz,
    closed_by     text,
    close_comment text,
    CHECK ((closed_at IS NULL) = (closed_by IS NULL))
);

-- The guard looks up the requesting subject's open session on every request: one probe of this partial index,
-- which holds only sessions not yet closed (a handful at any time).
CREATE INDEX break_glass_open ON break_glass_sessions (issuer, sub, expires_at DESC) WHERE closed_at IS NULL;

-- Reviewers list sessions newest first.
CREATE INDEX break_glass_started ON break_glass_sessions (started_at DESC, id);
