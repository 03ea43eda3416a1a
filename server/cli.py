"""The `hounsfield` command: `serve`, `import DIR`, `gc`, `models ...`."""

from __future__ import annotations

import argparse
import ctypes
import importlib
import logging
import os
import signal
import sys
from pathlib import Path

from server.settings import Settings, SettingsError

M_ARENA_MAX = -8
"""glibc's mallopt parameter number for the arena limit (malloc.h)."""


def _settings(args: argparse.Namespace) -> Settings:
    env = dict(os.environ)
    if getattr(args, "data", None):
        env["HOUNSFIELD_DATA"] = str(args.data)
    if getattr(args, "host", None):
        env["HOUNSFIELD_HOST"] = args.host
    if getattr(args, "port", None) is not None:
        env["HOUNSFIELD_PORT"] = str(args.port)
    return Settings.from_env(env)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app

    settings = _settings(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limit_malloc_arenas(settings.malloc_arenas)
    app = create_app(settings)
    # uvicorn re-raises SIGTERM after its graceful shutdown, which would skip atexit handlers (the embedded
    # PostgreSQL is stopped by one): turn SIGTERM into a normal exit instead.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    print(
        f"Hounsfield on http://{settings.host}:{settings.port}/dicom-web (data: {settings.data_dir})",
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
        timeout_graceful_shutdown=10,
    )
    return 0


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hounsfield", description="Hounsfield imaging server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1, or HOUNSFIELD_HOST)")
    serve.add_argument("--port", type=int, help="port (default 8080, or HOUNSFIELD_PORT)")
    serve.add_argument("--data", type=Path, help="data folder (default ./var, or HOUNSFIELD_DATA)")
    serve.set_defaults(func=cmd_serve)
    for name in ("cli_import", "cli_token", "cli_audit"):  # each subcommand module adds its parsers
        try:
            module = importlib.import_module(f"server.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"server.{name}":
                raise
            continue
        module.register(sub)
    from inference import cli as models_cli  # `hounsfield models register|list|promote|shadow|retire`

    models_cli.register(sub)
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
