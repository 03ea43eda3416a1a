"""Two database roles: the schema's owner applies migrations; the server serves as `hounsfield_app`, which may
only append to the audit trail (migrations/0014_app_role.sql). A server connected as a superuser or as the
owner could switch the append-only triggers off and rewrite the trail itself; as the app role a compromised
server (an injection, a stolen process) can add records but never change one.

- Embedded PostgreSQL (no DATABASE_URL): the superuser of the data folder's cluster applies migrations, gives
  the app role LOGIN (the cluster listens on its Unix socket only) and the pool connects as the app role.
- External PostgreSQL: DATABASE_URL is the serving role (a login role that is a member of `hounsfield_app`);
  HOUNSFIELD_DATABASE_OWNER_URL the owner's, used only to apply migrations. Without an owner URL the migrations
  run on DATABASE_URL, which must then own the schema: the server refuses to serve as a role that can rewrite
  the audit trail unless HOUNSFIELD_DATABASE_ALLOW_PRIVILEGED is true (it then logs an error at every start).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import anyio.to_thread
import asyncpg

from server.platform import db
from server.platform.settings import PlatformSettings

log = logging.getLogger(__name__)
SQL = db.Queries(Path(__file__).with_name("dbroles.sql"))

APP_ROLE = "hounsfield_app"


class DatabaseRoleError(RuntimeError):
    """The serving role can rewrite the audit trail and that was not explicitly allowed."""


@dataclass(frozen=True, slots=True)
class DatabaseUrls:
    serving: str
    """What the pool connects with: the app role (or the one DATABASE_URL names)."""
    owner: str | None
    """The schema owner's URL, for migrations; None when DATABASE_URL must apply them itself."""


def with_user(url: str, user: str) -> str:
    """`url` with its user replaced and no password: the embedded cluster trusts its socket's clients."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}@{host}"))


async def database_urls(settings: PlatformSettings) -> DatabaseUrls:
    """Start the embedded PostgreSQL when no DATABASE_URL is set; bring the schema up to date as its owner."""
    if settings.database_url:
        urls = DatabaseUrls(settings.database_url, settings.database_owner_url)
        if urls.owner is not None:
            await _migrate(urls.owner, allow_login=False)
        return urls
    owner = await anyio.to_thread.run_sync(db.start_embedded, settings.data_dir / "pg")
    await _migrate(owner, allow_login=True)
    return DatabaseUrls(with_user(owner, APP_ROLE), owner)


async def database_url(settings: PlatformSettings) -> str:
    """The URL to serve with (the app role), once the schema's owner applied the migrations."""
    return (await database_urls(settings)).serving


async def _migrate(owner_url: str, *, allow_login: bool) -> None:
    conn = await asyncpg.connect(owner_url)
    try:
        await db.migrate(conn)
        if allow_login and not await conn.fetchval(SQL["app_role_login"]):
            await conn.execute(SQL["allow_app_role_login"])
        if allow_login:  # the embedded cluster, whose settings are ours
            await conn.execute(SQL["embedded_socket_permissions"])
    finally:
        await conn.close()


async def check_serving_role(conn: db.Connection, *, allow_privileged: bool) -> None:
    """Refuse (DatabaseRoleError) to serve as a role that could rewrite the audit trail, or log an error when
    HOUNSFIELD_DATABASE_ALLOW_PRIVILEGED allows it."""
    row = await conn.fetchrow(SQL["serving_role"])
    assert row is not None
    powers = [name for name in ("superuser", "owner", "may_rewrite") if row[name]]
    if conn.get_server_version().major >= 15 and await conn.fetchval(SQL["may_skip_triggers"]):
        powers.append("may_skip_triggers")
    if not powers:
        return
    what = {
        "superuser": "is a superuser",
        "owner": "owns the audit tables",
        "may_rewrite": "may UPDATE, DELETE, TRUNCATE or directly INSERT audit rows",
        "may_skip_triggers": "may SET session_replication_role",
    }
    reasons = ", ".join(what[p] for p in powers)
    message = (
        f"the server's database role {row['role']!r} can rewrite the audit trail ({reasons}): "
        f"serve as a member of {APP_ROLE} (DATABASE_URL) and apply migrations as the owner "
        "(HOUNSFIELD_DATABASE_OWNER_URL)"
    )
    if not allow_privileged:
        raise DatabaseRoleError(message + ", or set HOUNSFIELD_DATABASE_ALLOW_PRIVILEGED=true")
    log.error("%s; serving anyway (HOUNSFIELD_DATABASE_ALLOW_PRIVILEGED)", message)
