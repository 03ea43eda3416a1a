-- The tamper-evident audit trail (issue 3; authz/audit.py). One linear hash chain:
--   hash(seq) = sha256(prev_hash || canonical JSON of the record (UTF-8) || seq as 8-byte big-endian)
-- with prev_hash of the first record = 32 zero bytes. Records are appended only by audit_append(), which takes the
-- row lock on the one-row audit_head, so appends from any number of connections and processes form one chain
-- with gapless seq numbers. Statement triggers refuse UPDATE, DELETE and TRUNCATE (even of no rows): only someone
-- able to disable triggers (the table owner or a superuser) can alter the log, and `hounsfield audit verify` then
-- names what changed.

CREATE TABLE audit_log (
    seq         bigint PRIMARY KEY,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    record      jsonb NOT NULL,
    prev_hash   bytea NOT NULL,
    hash        bytea NOT NULL
);
-- Exports and searches by time; recorded_at only grows with seq, so a BRIN index is enough and costs appends
-- almost nothing.
CREATE INDEX audit_log_recorded_at ON audit_log USING brin (recorded_at);

-- The chain head: the last seq and its hash. Its row lock serializes appenders (held for one short transaction).
CREATE TABLE audit_head (
    id   boolean PRIMARY KEY DEFAULT true CHECK (id),
    seq  bigint NOT NULL,
    hash bytea NOT NULL
);
INSERT INTO audit_head (id, seq, hash) VALUES (true, 0, '\x0000000000000000000000000000000000000000000000000000000000000000');

-- Signed checkpoints of the chain head (the periodic `audit.checkpoint` job). The signed message is
-- authz/audit.py checkpoint_message(seq, hash, signed_at).
CREATE TABLE audit_checkpoints (
    seq       bigint PRIMARY KEY,
    hash      bytea NOT NULL,
    signed_at timestamptz NOT NULL,
    signature bytea NOT NULL,
    key_id    text NOT NULL
);

CREATE FUNCTION audit_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit trail is append-only: % on % is not allowed', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_head_no_delete BEFORE DELETE ON audit_head
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_head_no_truncate BEFORE TRUNCATE ON audit_head
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

-- Append records (canonical JSON texts, in order) in one statement: lock the head, chain, insert, move the head.
-- Returns the seq of the first; the others follow it without gaps. One round trip per call.
CREATE FUNCTION audit_append(records text[]) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    head_seq  bigint;
    head_hash bytea;
    first_seq bigint;
    rec       text;
    new_hash  bytea;
BEGIN
    SELECT seq, hash INTO head_seq, head_hash FROM audit_head WHERE id FOR UPDATE;
    first_seq := head_seq + 1;
    FOREACH rec IN ARRAY records LOOP
        head_seq := head_seq + 1;
        new_hash := sha256(head_hash || convert_to(rec, 'UTF8') || int8send(head_seq));
        INSERT INTO audit_log (seq, record, prev_hash, hash) VALUES (head_seq, rec::jsonb, head_hash, new_hash);
        head_hash := new_hash;
    END LOOP;
    UPDATE audit_head SET seq = head_seq, hash = head_hash WHERE id;
    RETURN first_seq;
END $$;
