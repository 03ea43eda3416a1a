-- Named queries for the audit trail (migrations/0004_audit.sql; authz/auditchain.py).

-- name: append
-- $1: canonical JSON texts in order. first_seq: the seq of the first, the rest following it without gaps; before
-- them, the committed deferred records were chained from pending_first on (none when it equals first_seq).
SELECT pending_first, first_seq FROM audit_chain($1::text[]);

-- name: defer
-- $1: canonical JSON texts in order, written as part of the caller's transaction (migrations/0016).
SELECT audit_defer($1::text[]);

-- name: pending_count
SELECT count(*) FROM audit_pending;

-- name: head
SELECT seq, hash FROM audit_head WHERE id;

-- name: last_record
SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1;

-- name: chain_range
-- The chain in order, seqs in ($1, $2], for a cursor. record::text is PostgreSQL's text of the jsonb; verify
-- parses it and serializes it canonically again before hashing.
SELECT seq, record::text AS record, prev_hash, hash, recorded_at FROM audit_log WHERE seq > $1 AND seq <= $2
ORDER BY seq;

-- name: checkpoints
SELECT seq, hash, signed_at, signature, key_id FROM audit_checkpoints ORDER BY seq;

-- name: last_checkpoint
SELECT seq, hash, signed_at, signature, key_id FROM audit_checkpoints ORDER BY seq DESC LIMIT 1;

-- name: insert_checkpoint
INSERT INTO audit_checkpoints (seq, hash, signed_at, signature, key_id) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (seq) DO NOTHING;

-- name: export_since
-- Records recorded at or after $1 and before $2 (NULL: no bound), in chain order, for a cursor.
SELECT seq, recorded_at, record::text AS record FROM audit_log
WHERE recorded_at >= $1 AND ($2::timestamptz IS NULL OR recorded_at < $2)
ORDER BY seq;
