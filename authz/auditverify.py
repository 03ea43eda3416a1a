"""Verify the audit chain (`hounsfield audit verify`): stream it in seq order in one snapshot, re-hash every
record, follow every link, check the chain head and each signed checkpoint, and name what changed.

Evidence gathered per row r (seq s), p = the row before it:
- content: sha256(r.prev_hash || canonical(r.record) || s) must equal r.hash (a "suspect" when not);
- link: r.prev_hash must equal p.hash when s = p.seq + 1 (a "break" when not);
- gap: s must be p.seq + 1 (seq 1 first).

How each kind is told apart (the seq named is the first one affected):
- modified: a suspect that no other position explains (its record was edited in place, hash kept); or a break
  after a row whose content verifies (that row was rewritten and re-hashed: the next row still names its old
  hash); or, with a valid signed checkpoint at seq c whose hash the log no longer holds, a rewrite somewhere
  between the previous checkpoint and c (the chain was re-hashed consistently up to c).
- deleted: a gap (seqs a..b are missing); or the log ends before the chain head or before a signed checkpoint
  (records cut off the end); or a run of suspects each holding the record of the next seq (one was deleted and
  the later ones renumbered): named at the first renumbered seq, where the deleted record was.
- reordered: a suspect holding a record that belongs at another seq m: its stored hash is the one the row after m
  links to, or its record re-hashes correctly at m. Two rows that hold each other's records are both named.
- inserted: rows beyond the chain head (not written by audit_append); a run of suspects each holding the record
  of the previous seq (a record was inserted before them and the later ones renumbered up); or a break whose
  prev_hash is the hash two rows back (the row between is not part of the chain).
- bad_checkpoint: a checkpoint whose signature does not verify under the key it names (forged, altered, or
  signed with a key the verifier does not know), in the database or in an anchor. An anchor entry that is not
  a checkpoint at all (a line torn by a crash, junk appended by someone) proves nothing either way: it is left
  for the caller to show, not counted as a problem.

Against the anchored copies (`authz.auditanchor`, read from sinks the database's owner cannot rewrite):
- anchor_mismatch: the chain's hash at an anchored checkpoint's seq is not the anchored hash (the chain was
  rewritten up to there, however consistently it was re-hashed), or the database's checkpoint at that seq
  signs another hash.
- missing_checkpoint: an anchored checkpoint the database no longer holds (deleted); or records older than
  `max_age` (one checkpoint interval plus a grace, by the database's `recorded_at`) that no anchored
  checkpoint covers, or, without anchors, no signed checkpoint at all: the job stopped, a sink failed, or the
  checkpoints that covered them were deleted.
An anchored checkpoint beyond the end of the log is a deletion (`deleted`, at the first missing seq).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import asyncpg

from authz.auditchain import GENESIS, SQL, Checkpoint, Verifier, chain_hash, checkpoint_message
from authz.auditrecord import canonical_json

if TYPE_CHECKING:
    from authz.auditanchor import Anchored

ProblemKind = Literal[
    "modified", "deleted", "reordered", "inserted", "bad_checkpoint", "missing_checkpoint", "anchor_mismatch"
]
_MAX_SEQ = 2**63 - 1
_MAX_SUSPECTS = 10_000
"""Suspects kept with their record text for the reorder analysis; beyond, they are reported as modified."""
_MAX_PAIRWISE = 200
"""Up to this many suspects, every pair is tried for swapped records without their hashes."""


@dataclass(frozen=True, slots=True)
class Problem:
    seq: int
    kind: ProblemKind
    detail: str

    def __str__(self) -> str:
        return f"seq {self.seq}: {self.kind}: {self.detail}"


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    checked: int
    """Records re-hashed."""
    problems: list[Problem]
    head_seq: int = 0
    checkpoints: int = 0
    """Checkpoints whose signature verified."""
    last_checkpoint: int | None = None
    """seq of the last checkpoint with a valid signature."""
    anchored: int = 0
    """Distinct anchored checkpoints whose signature verified (0 when verified without anchors)."""
    last_anchored: int | None = None
    """seq of the newest of them."""


@dataclass(slots=True)
class _Suspect:
    seq: int
    prev_hash: bytes
    hash: bytes
    canonical: str | None


@dataclass(slots=True)
class _Chain:
    """Takes rows in seq order and keeps the evidence; `problems()` classifies it."""

    prev_seq: int = 0
    prev_hash: bytes = GENESIS
    watch: Collection[int] = ()
    checked: int = 0
    prev2_hash: bytes | None = None
    suspects: dict[int, _Suspect] = field(default_factory=dict)
    breaks: list[tuple[int, bool]] = field(default_factory=list)
    """(seq, links two back) for rows whose prev_hash is not the previous row's hash."""
    expected_at: dict[bytes, int] = field(default_factory=dict)
    """A broken link's prev_hash -> the seq that should hold that hash."""
    gaps: list[tuple[int, int]] = field(default_factory=list)
    watched: dict[int, bytes] = field(default_factory=dict)

    def feed(self, seq: int, record_text: str, prev_hash: bytes, stored_hash: bytes) -> None:
        canonical = canonical_json(json.loads(record_text))
        self.checked += 1
        if chain_hash(prev_hash, canonical, seq) != stored_hash:
            keep = canonical if len(self.suspects) < _MAX_SUSPECTS else None
            self.suspects[seq] = _Suspect(seq, prev_hash, stored_hash, keep)
        if seq != self.prev_seq + 1:
            self.gaps.append((self.prev_seq + 1, seq - 1))
            self.prev2_hash = None
        else:
            if prev_hash != self.prev_hash:
                self.breaks.append((seq, self.prev2_hash is not None and prev_hash == self.prev2_hash))
                self.expected_at.setdefault(prev_hash, seq - 1)
            self.prev2_hash = self.prev_hash
        if seq in self.watch:
            self.watched[seq] = stored_hash
        self.prev_seq, self.prev_hash = seq, stored_hash

    def _origin(self, suspect: _Suspect) -> int | None:
        """The seq whose record this suspect holds, when another position explains it."""
        moved = self.expected_at.get(suspect.hash)
        if moved is not None and moved != suspect.seq:
            return moved
        if suspect.canonical is None:
            return None
        for delta in (1, -1):
            if chain_hash(suspect.prev_hash, suspect.canonical, suspect.seq + delta) == suspect.hash:
                return suspect.seq + delta
        if len(self.suspects) <= _MAX_PAIRWISE:
            for other in self.suspects.values():
                if other.seq != suspect.seq and chain_hash(other.prev_hash, suspect.canonical, other.seq) == other.hash:
                    return other.seq
        return None

    def problems(self) -> list[Problem]:
        found = [Problem(a, "deleted", _missing(a, b)) for a, b in self.gaps]
        origin = {seq: o for seq, s in self.suspects.items() if (o := self._origin(s)) is not None}
        done: set[int] = set()
        for seq in sorted(origin):
            if seq in done:
                continue
            other = origin[seq]
            if origin.get(other) == seq:
                found.append(Problem(seq, "reordered", f"holds the record of seq {other}, and seq {other} its record"))
                found.append(Problem(other, "reordered", f"holds the record of seq {seq}, and seq {seq} its record"))
                done |= {seq, other}
            elif other in (seq + 1, seq - 1):
                delta = other - seq
                end = seq
                while origin.get(end + 1) == end + 1 + delta and origin.get(end + 1 + delta) != end + 1:
                    end += 1
                done.update(range(seq, end + 1))
                if delta == 1:
                    detail = f"a record was deleted here and seqs {seq}..{end} renumbered (each holds the next one)"
                    found.append(Problem(seq, "deleted", detail))
                else:
                    detail = f"seq {seq - 1} was inserted; seqs {seq}..{end} hold the records of the seq before them"
                    found.append(Problem(seq - 1, "inserted", detail))
            else:
                found.append(Problem(seq, "reordered", f"holds the record of seq {other}"))
                done.add(seq)
        for seq in sorted(set(self.suspects) - done):
            found.append(Problem(seq, "modified", "its record does not match its hash"))
        affected = set(self.suspects)
        for seq, two_back in self.breaks:
            if seq in affected or seq - 1 in affected:
                continue
            if two_back:
                found.append(Problem(seq - 1, "inserted", f"seq {seq} chains to seq {seq - 2}: seq {seq - 1} is extra"))
            else:
                detail = f"rewritten with a new hash: seq {seq} still links to its old hash"
                found.append(Problem(seq - 1, "modified", detail))
        return found


def _missing(a: int, b: int) -> str:
    return f"seq {a} is missing" if a == b else f"seqs {a}..{b} are missing"


async def verify(
    pool: asyncpg.Pool,
    verifier: Verifier,
    *,
    batch: int = 2000,
    max_problems: int = 1000,
    anchors: Sequence[Anchored] | None = None,
    max_age: dt.timedelta | None = None,
    now: dt.datetime | None = None,
) -> VerifyResult:
    """Check the whole chain, its head and its checkpoints in one REPEATABLE READ snapshot, streaming rows with a
    cursor (`batch` at a time), so memory does not grow with the number of records. With `anchors` (entries read
    from the anchor sinks, possibly none) the chain is also checked against them; with `max_age`, records older
    than that must be covered by an anchored checkpoint (by a signed one in the database without `anchors`)."""
    anchored = _valid_anchors(anchors or (), verifier)
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        head = await conn.fetchrow(SQL["head"])
        checkpoints = await conn.fetch(SQL["checkpoints"])
        chain = _Chain(watch={int(c["seq"]) for c in checkpoints} | {a.seq for a, _ in anchored})
        if anchors is not None:
            covered = max((a.seq for a, _ in anchored), default=0)
        else:
            covered = max((int(c["seq"]) for c in checkpoints if _signed(c, verifier)), default=0)
        deadline = None if max_age is None else (now or dt.datetime.now(dt.UTC)) - max_age
        stale: tuple[int, dt.datetime] | None = None
        async for row in conn.cursor(SQL["chain_range"], 0, _MAX_SEQ, prefetch=batch):
            seq = int(row["seq"])
            chain.feed(seq, row["record"], bytes(row["prev_hash"]), bytes(row["hash"]))
            if stale is None and deadline is not None and seq > covered and row["recorded_at"] < deadline:
                stale = (seq, row["recorded_at"])
    problems = chain.problems()
    affected = {p.seq for p in problems}
    last = chain.prev_seq
    head_seq = int(head["seq"]) if head is not None else 0
    if head_seq > last:
        problems.append(Problem(last + 1, "deleted", f"{_missing(last + 1, head_seq)} at the end of the log"))
    elif head_seq < last:
        detail = f"seqs {head_seq + 1}..{last} lie beyond the chain head (not written by audit_append)"
        problems.append(Problem(head_seq + 1, "inserted", detail))
    elif head is not None and bytes(head["hash"]) != chain.prev_hash and last not in affected and last > 0:
        problems.append(Problem(last, "modified", "its hash is not the one the chain head recorded"))
    valid = 0
    last_valid: int | None = None
    for cp in checkpoints:
        seq, signed = int(cp["seq"]), bytes(cp["hash"])
        message = checkpoint_message(seq, signed, cp["signed_at"])
        when = cp["signed_at"].isoformat()
        if not verifier(message, bytes(cp["signature"]), str(cp["key_id"])):
            detail = f"the checkpoint signed at {when} does not verify under key {cp['key_id']!r}"
            problems.append(Problem(seq, "bad_checkpoint", detail))
            continue
        valid += 1
        since = (last_valid or 0) + 1
        if seq > last:
            detail = f"the log ends at seq {last}, but a checkpoint signed at {when} covers seq {seq}"
            problems.append(Problem(last + 1, "deleted", detail))
        elif seq in chain.watched and chain.watched[seq] != signed and seq not in affected:
            detail = f"the chain was rewritten in seqs {since}..{seq}: its hash differs from the one signed at {when}"
            problems.append(Problem(seq, "modified", detail))
        last_valid = seq
    if anchors is not None:
        problems += _anchor_problems(anchors, anchored, verifier, checkpoints, chain, last)
    if stale is not None:
        seq, when = stale
        newest = f"the newest anchored checkpoint is at seq {covered}" if covered else "there is none"
        if anchors is None:
            newest = f"the newest signed checkpoint is at seq {covered}" if covered else "none was signed"
        detail = (
            f"seqs {seq}..{last} are not covered by an anchored checkpoint although recorded since "
            f"{when.isoformat()} ({newest}): checkpoints stopped, failed to anchor, or were deleted"
        )
        problems.append(Problem(seq, "missing_checkpoint", detail))
    first: dict[tuple[int, str], Problem] = {}
    for problem in problems:
        first.setdefault((problem.seq, problem.kind), problem)
    unique = sorted(first.values(), key=lambda p: (p.seq, p.kind))
    last_anchored = max((a.seq for a, _ in anchored), default=None)
    return VerifyResult(
        not unique, chain.checked, unique[:max_problems], head_seq, valid, last_valid, len(anchored), last_anchored
    )


def _signed(row: asyncpg.Record, verifier: Verifier) -> bool:
    message = checkpoint_message(int(row["seq"]), bytes(row["hash"]), row["signed_at"])
    return verifier(message, bytes(row["signature"]), str(row["key_id"]))


def _valid_anchors(anchors: Sequence[Anchored], verifier: Verifier) -> list[tuple[Checkpoint, str]]:
    """The distinct anchored checkpoints whose signature verifies, in seq order, with where each was read."""
    seen: dict[tuple[int, bytes, dt.datetime], tuple[Checkpoint, str]] = {}
    for item in anchors:
        cp = item.checkpoint
        if cp is None or (cp.seq, cp.hash, cp.signed_at) in seen:
            continue
        if verifier(checkpoint_message(cp.seq, cp.hash, cp.signed_at), cp.signature, cp.key_id):
            seen[(cp.seq, cp.hash, cp.signed_at)] = (cp, item.source)
    return sorted(seen.values(), key=lambda pair: (pair[0].seq, pair[0].signed_at))


def _anchor_problems(
    anchors: Sequence[Anchored],
    anchored: list[tuple[Checkpoint, str]],
    verifier: Verifier,
    checkpoints: Sequence[asyncpg.Record],
    chain: _Chain,
    last: int,
) -> list[Problem]:
    """Each anchored copy against the chain and the database's checkpoints."""
    found: list[Problem] = []
    for item in anchors:
        cp = item.checkpoint
        if cp is not None and not verifier(checkpoint_message(cp.seq, cp.hash, cp.signed_at), cp.signature, cp.key_id):
            detail = f"the copy in {item.source} does not verify under key {cp.key_id!r}"
            found.append(Problem(cp.seq, "bad_checkpoint", detail))
    in_db = {int(c["seq"]): c for c in checkpoints}
    since = 1
    for cp, source in anchored:
        when = cp.signed_at.isoformat()
        if cp.seq > last:
            detail = f"the log ends at seq {last}; the checkpoint anchored in {source} (signed {when}) covers {cp.seq}"
            found.append(Problem(last + 1, "deleted", detail))
            continue
        if chain.watched.get(cp.seq) != cp.hash:
            detail = (
                f"the chain's hash at seq {cp.seq} is not the one anchored in {source} (signed {when}): "
                f"seqs {since}..{cp.seq} were rewritten"
            )
            found.append(Problem(cp.seq, "anchor_mismatch", detail))
        since = cp.seq + 1
        row = in_db.get(cp.seq)
        if row is None or row["signed_at"] != cp.signed_at:
            held = "" if row is None else f" (it holds one signed {row['signed_at'].isoformat()})"
            detail = f"the checkpoint signed {when}, anchored in {source}, is not in the database{held}"
            found.append(Problem(cp.seq, "missing_checkpoint", detail))
        elif bytes(row["hash"]) != cp.hash:
            detail = f"the database's checkpoint signed {when} signs another hash than its copy in {source}"
            found.append(Problem(cp.seq, "anchor_mismatch", detail))
    return found


async def verify_segment(pool: asyncpg.Pool, start_seq: int, start_hash: bytes, end_seq: int) -> list[Problem]:
    """Check the records in (start_seq, end_seq] against a trusted start (the last checkpoint)."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        chain = _Chain(prev_seq=start_seq, prev_hash=start_hash)
        async for row in conn.cursor(SQL["chain_range"], start_seq, end_seq, prefetch=2000):
            chain.feed(int(row["seq"]), row["record"], bytes(row["prev_hash"]), bytes(row["hash"]))
    problems = chain.problems()
    if chain.prev_seq < end_seq:
        problems.append(Problem(chain.prev_seq + 1, "deleted", _missing(chain.prev_seq + 1, end_seq)))
    return problems
