-- Audit records that belong to another transaction (authz/audit.py `AuditTrail.append_in`): the record of a
-- stored instance (DICOM Instances Transferred, PS3.15 A.5.3.4) must commit or roll back with the instance's index
-- rows, yet the chain head's row lock must not be held for the rest of that transaction: every other ingest and
-- every request's record would wait for it to commit, one commit at a time.
--
-- Such a record is deferred (audit_defer): inserted into audit_pending, which takes no lock shared with anyone and
-- allocates no seq. audit_chain, which every append now goes through, first moves the committed pending records
-- into the chain under the head's lock, in the order they were deferred, then appends its own. A record whose
-- transaction rolled back never existed, so seq numbers stay gapless and every link holds; one committed but not
-- yet chained (a crash in between) is chained by the next append or checkpoint.
--
-- The app role may EXECUTE both functions (SECURITY DEFINER, fixed search_path, as audit_append in 0014) and
-- SELECT audit_pending, nothing more: it cannot take back a deferred record.

CREATE TABLE audit_pending (
    id     bigserial PRIMARY KEY,
    -- The canonical JSON text that will be hashed; checked to be JSON now, so that chaining it cannot fail later.
    record text NOT NULL CHECK (record::jsonb IS NOT NULL)
);

CREATE FUNCTION audit_defer(records text[]) RETURNS void LANGUAGE sql AS $$
    INSERT INTO audit_pending (record)
    SELECT r FROM unnest(records) WITH ORDINALITY AS t (r, n) ORDER BY n
$$;

-- Chain the committed pending records, then append `records` (canonical JSON texts, in order). pending_first: the
-- seq of the first pending record chained (= first_seq when there was none); first_seq: the seq of records[1], the
-- others following it without gaps.
CREATE FUNCTION audit_chain(records text[], OUT pending_first bigint, OUT first_seq bigint) LANGUAGE plpgsql AS $$
DECLARE
    head_seq  bigint;
    head_hash bytea;
    start_seq bigint;
    item      record;
    rec       text;
    new_hash  bytea;
    chained   bigint[] := '{}';
BEGIN
    SELECT seq, hash INTO head_seq, head_hash FROM audit_head WHERE id FOR UPDATE;
    start_seq := head_seq;
    pending_first := head_seq + 1;
    -- A new snapshot, taken after the lock: pending records chained by the previous holder are gone.
    FOR item IN SELECT id, record FROM audit_pending ORDER BY id LOOP
        head_seq := head_seq + 1;
        new_hash := sha256(head_hash || convert_to(item.record, 'UTF8') || int8send(head_seq));
        INSERT INTO audit_log (seq, record, prev_hash, hash)
        VALUES (head_seq, item.record::jsonb, head_hash, new_hash);
        head_hash := new_hash;
        chained := chained || item.id;
    END LOOP;
    IF cardinality(chained) > 0 THEN
        DELETE FROM audit_pending WHERE id = ANY (chained);
    END IF;
    first_seq := head_seq + 1;
    FOREACH rec IN ARRAY coalesce(records, '{}') LOOP
        head_seq := head_seq + 1;
        new_hash := sha256(head_hash || convert_to(rec, 'UTF8') || int8send(head_seq));
        INSERT INTO audit_log (seq, record, prev_hash, hash) VALUES (head_seq, rec::jsonb, head_hash, new_hash);
        head_hash := new_hash;
    END LOOP;
    IF head_seq <> start_seq THEN
        UPDATE audit_head SET seq = head_seq, hash = head_hash WHERE id;
    END IF;
END $$;

-- The seq of the first record, as audit_append always returned; the pending records are chained first.
CREATE OR REPLACE FUNCTION audit_append(records text[]) RETURNS bigint LANGUAGE sql AS $$
    SELECT first_seq FROM audit_chain(records)
$$;

DO $$
DECLARE
    s text := current_schema();
BEGIN
    EXECUTE format('ALTER FUNCTION audit_append(text[]) SECURITY DEFINER SET search_path = %I, pg_temp', s);
    EXECUTE format('ALTER FUNCTION audit_chain(text[]) SECURITY DEFINER SET search_path = %I, pg_temp', s);
    EXECUTE format('ALTER FUNCTION audit_defer(text[]) SECURITY DEFINER SET search_path = %I, pg_temp', s);
END $$;

REVOKE ALL ON audit_pending FROM PUBLIC, hounsfield_app;
REVOKE ALL ON SEQUENCE audit_pending_id_seq FROM PUBLIC, hounsfield_app;
GRANT SELECT ON audit_pending TO hounsfield_app;
REVOKE ALL ON FUNCTION audit_chain(text[]), audit_defer(text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION audit_chain(text[]), audit_defer(text[]) TO hounsfield_app;
