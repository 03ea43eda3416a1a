-- Named queries of the anchor bookkeeping (migrations/0015_audit_anchors.sql; authz/auditanchor.py).

-- name: unanchored
-- The checkpoints sink $1 does not hold yet, oldest first, at most $2.
SELECT c.seq, c.hash, c.signed_at, c.signature, c.key_id FROM audit_checkpoints c
WHERE NOT EXISTS (SELECT 1 FROM audit_anchored a WHERE a.sink = $1 AND a.seq = c.seq)
ORDER BY c.seq LIMIT $2;

-- name: mark_anchored
INSERT INTO audit_anchored (sink, seq) VALUES ($1, $2) ON CONFLICT DO NOTHING;
