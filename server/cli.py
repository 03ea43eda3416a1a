"""The `hounsfield` command: `serve`, `import DIR`, `gc`, `models ...`."""

from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

from server.clisettings import env_overrides, settings_from_args
from server.platform import logs, private
from server.settings import Settings, SettingsError

M_ARENA_MAX = -8
"""glibc's mallopt parameter number for the arena limit (malloc.h)."""


def _start_process(settings: Settings) -> None:
    """Process-wide set-up of a serving process: files it makes are its user's alone (the data folder holds PHI;
    `server.platform.private` sets the modes explicitly too), logging without PHI (`server.platform.logs`),
    malloc arenas."""
    os.umask(0o077)
    logs.configure(settings.log_level)
    limit_malloc_arenas(settings.malloc_arenas)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    _start_process(settings)
    if settings.processes > 1:
        return _serve_processes(settings, env_overrides(args))
    from server.app import create_app

    app = create_app(settings)
    # uvicorn re-raises SIGTERM after its graceful shutdown, which would skip atexit handlers (the embedded
    # PostgreSQL is stopped by one): turn SIGTERM into a normal exit instead.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    _run_uvicorn(settings, app)
    return 0


def _run_uvicorn(settings: Settings, app: Any, **options: Any) -> None:
    """Announce the server and run uvicorn on `app` (an app, or an import string with `options` for workers), with
    the header deadline and connection limit of `server.platform.connections` and uvicorn's keep-alive timeout."""
    import functools

    import uvicorn

    from server.platform.connections import ConnectionLimits, HttpProtocol, connection_budget, raise_fd_limit

    fd_limit = raise_fd_limit()  # before the processes start: they inherit it
    max_connections = connection_budget(settings.http_max_connections, fd_limit)
    if max_connections < settings.http_max_connections:
        print(
            f"HOUNSFIELD_HTTP_MAX_CONNECTIONS lowered to {max_connections}: the open file limit is {fd_limit}",
            file=sys.stderr,
            flush=True,
        )
    limits = ConnectionLimits(float(settings.http_header_timeout_seconds), max_connections)
    protocol: Any = functools.partial(HttpProtocol, limits=limits)
    processes = f", {settings.processes} processes" if settings.processes > 1 else ""
    print(
        f"Hounsfield on http://{settings.host}:{settings.port}/dicom-web{processes} (data: {settings.data_dir})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        proxy_headers=False,
        server_header=False,
        http=protocol,
        timeout_keep_alive=settings.http_keepalive_seconds,
        timeout_graceful_shutdown=10,
        **logs.uvicorn_options(),
        **options,
    )


def _serve_processes(settings: Settings, overrides: dict[str, str]) -> int:
    """`HOUNSFIELD_PROCESSES` > 1: uvicorn's supervisor runs that many processes (`process_app`) on one listening
    socket and replaces one that dies. This parent owns the embedded PostgreSQL (started here and stopped when it
    exits), so the processes, which get its URL, can come and go."""
    import asyncio

    from server.platform.dbroles import database_url
    from server.platform.dbwatch import EmbeddedSupervisor

    os.environ.update(overrides)  # the processes read their settings from the environment
    supervisor = None
    if not settings.database_url:  # started and migrated here; the processes connect as the app role
        os.environ["DATABASE_URL"] = asyncio.run(database_url(settings))
        supervisor = EmbeddedSupervisor(settings.data_dir / "pg")  # started again if it dies; they reconnect
        supervisor.start()
    try:
        _run_uvicorn(settings, "server.cli:process_app", factory=True, workers=settings.processes)
    finally:
        if supervisor is not None:
            supervisor.stop()  # before the exit handler stops the embedded PostgreSQL
    return 0  # the supervisor stopped its processes (SIGINT, SIGTERM) and returned: exit handlers run now


def process_app() -> Any:
    """The app of one of `_serve_processes`' processes. Each serves HTTP and runs the DICOM AE on the shared ports
    (`dicomweb.dimse.service`). The first to lock the data folder's `primary.lock` (held while the process lives;
    the replacement of a primary that died takes it over) also runs the job worker and uses the C-STORE intake's
    first slot; each of the others holds a slot of its own (`dicomweb.dimse.intake`)."""
    from dicomweb.dimse.intake import claim_slot
    from server.app import create_app

    settings = Settings.from_env()
    _start_process(settings)
    lock = claim_primary(settings.data_dir)
    slot_lock = None
    if lock is None:
        slot, slot_lock = claim_slot(settings.intake_root)
        settings = settings.with_overrides(worker_enabled=False, dimse_intake_slot=slot)
    app = create_app(settings)
    app.state.primary_lock = lock  # the descriptors live as long as the app
    app.state.intake_slot_lock = slot_lock
    return app


def claim_primary(folder: Path) -> int | None:
    """An open descriptor holding an exclusive lock on `folder/primary.lock`, or None when another process of this
    server holds it. The kernel releases the lock with the process."""
    import fcntl

    private.make_dirs(folder)
    fd = os.open(folder / "primary.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def limit_malloc_arenas(arenas: int) -> bool:
    """glibc's `mallopt(M_ARENA_MAX, arenas)` before the server starts its threads (`HOUNSFIELD_MALLOC_ARENAS`);
    False where there is nothing to do (0, or a C library that is not glibc)."""
    if arenas <= 0:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_ARENA_MAX, arenas))


def _register_commands(sub: Any) -> None:
    for name in ("cli_import", "cli_token", "cli_audit", "cli_conformance"):  # each subcommand module adds its parsers
        try:
            module = importlib.import_module(f"server.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"server.{name}":
                raise
            continue
        module.register(sub)
    from inference import cli as models_cli  # `hounsfield models register|list|promote|shadow|retire`

    models_cli.register(sub, settings_from_args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hounsfield", description="Hounsfield imaging server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1, or HOUNSFIELD_HOST)")
    serve.add_argument("--port", type=int, help="port (default 8080, or HOUNSFIELD_PORT)")
    serve.add_argument("--data", type=Path, help="data folder (default ./var, or HOUNSFIELD_DATA)")
    serve.set_defaults(func=cmd_serve)
    words = sys.argv[1:] if argv is None else argv
    if words[:1] != ["serve"]:  # the other commands' modules import the whole server: `serve`'s parent needs none
        _register_commands(sub)
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
