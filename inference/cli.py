"""`hounsfield models register|list|promote|shadow|retire`: the model registry from the command line, for the
operator of the server's data folder (or `DATABASE_URL`); the same checks as `POST /models`.

- `register FILE` (a JSON registration document, `-` for standard input; see `inference.registry.parse_model`);
  `register --shipped`: the registrations of the models this server ships (`inference/registrations/*.json`),
  idempotent: a version registered already is left as it is and said to be. `--status S` registers with that
  status whatever the documents say; a document without one registers as `shadow`, and the output always
  names the status each version got.
- `list [--name N] [--status S] [--json]`
- `promote NAME VERSION` (active; the version that was active is retired), `shadow NAME VERSION`,
  `retire NAME VERSION`.
- `deploy`: create or update the Ray Serve application of the active and shadow models on the cluster at
  `HOUNSFIELD_RAY_ADDRESS` / `RAY_ADDRESS` (see `inference.deploy`); prints one deployment per line.
Exit status 0 on success, 1 when the registry refuses (unknown model, duplicate version, invalid document).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg

from inference import registry
from inference.errors import InferenceError, ModelExists
from inference.models import catalog
from inference.settings import InferenceSettings
from server.platform import db
from server.platform.dbroles import database_url

STATUS_OF = {"promote": "active", "shadow": "shadow", "retire": "retired"}


@asynccontextmanager
async def _pool(settings: InferenceSettings) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(await database_url(settings), 1, 2)
    try:
        async with pool.acquire() as conn:
            await db.migrate(conn)
        yield pool
    finally:
        await pool.close()


def _read(path: str) -> Any:
    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InferenceError(f"{path}: not JSON: {exc}") from None


def _documents(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """(source, document) of each registration to make, with `--status` applied."""
    if args.shipped == (args.file is not None):
        raise InferenceError("models register: name a FILE or --shipped (one of them)")
    documents = registry.shipped_documents() if args.shipped else [(args.file, _read(args.file))]
    if args.status is not None:
        documents = [
            (source, {**raw, "status": args.status} if isinstance(raw, dict) else raw) for source, raw in documents
        ]
    return documents


async def _register(conn: db.Connection, models: list[tuple[registry.Model, bool]], *, shipped: bool) -> int:
    """Register each version and say with which status (and that it is the default when the document gave none);
    shipped ones that exist already are left as they are."""
    added = 0
    for model, named in models:
        try:
            stored = await registry.register(conn, model)
        except ModelExists:
            if not shipped:
                raise
            existing = await registry.get(conn, model.name, model.version)
            print(f"{existing.key} is registered already ({existing.status}): unchanged")
            continue
        added += 1
        default = "" if named else f" (no status given: {registry.DEFAULT_STATUS} is the default)"
        print(f"registered {stored.key} as {stored.status}{default}")
    if shipped and added == 0:
        print("nothing changed: every shipped model is registered already")
    if any(m.status == "shadow" for m, _ in models) and added:
        print("shadow versions run and record, and publish nothing; `hounsfield models promote NAME VERSION`")
    return 0


async def _run(settings: InferenceSettings, args: argparse.Namespace) -> int:
    command = args.models_command
    if command == "register":
        adapters = catalog(settings.inference_plugins)
        documents = _documents(args)
        registering = [
            (registry.parse_model(raw, adapters), isinstance(raw, dict) and "status" in raw) for _, raw in documents
        ]
    if command == "deploy":
        return await _deploy(settings)
    async with _pool(settings) as pool, pool.acquire() as conn:
        if command == "register":
            return await _register(conn, registering, shipped=args.shipped)
        if command == "list":
            models = await registry.list_models(conn, args.name, args.status)
            if args.json:
                print(json.dumps([m.to_json() for m in models]))
            for m in [] if args.json else models:
                print(f"{m.name}\t{m.version}\t{m.status}\t{m.adapter}\t{m.task}")
        else:
            changed = await registry.set_status(conn, args.name, args.version, STATUS_OF[command])  # type: ignore[arg-type]
            print(f"{changed.key} is {changed.status}")
    return 0


async def _deploy(settings: InferenceSettings) -> int:
    """`models deploy`: the registry's active and shadow versions onto the configured Ray cluster."""
    if settings.inference_ray_address is None:
        raise InferenceError("models deploy: set HOUNSFIELD_RAY_ADDRESS or RAY_ADDRESS (e.g. auto) to a Ray cluster")
    from inference import deploy

    async with _pool(settings) as pool, pool.acquire() as conn:
        models = [m for m in await registry.list_models(conn, None, None) if m.status != "retired"]
    await asyncio.to_thread(deploy.connect, settings, False)
    deploy.keep_signal_handlers()
    try:
        names = await asyncio.to_thread(deploy.deploy, models, settings)
    finally:
        await asyncio.to_thread(deploy.disconnect, False)
    for name in names:
        print(f"deployed {name} in {settings.inference_ray_app}")
    return 0


SettingsOf = Callable[[argparse.Namespace], InferenceSettings]
"""The settings a command runs with: the environment with the command line's options over it (`hounsfield`'s)."""


def cmd_models(args: argparse.Namespace, *, settings_of: SettingsOf) -> int:
    try:
        return asyncio.run(_run(settings_of(args), args))
    except (InferenceError, OSError) as exc:
        print(f"error: {getattr(exc, 'detail', exc)}", file=sys.stderr)
        return 1


def register(subparsers: Any, settings_of: SettingsOf) -> None:
    parser = subparsers.add_parser("models", help="register, list, promote, shadow or retire AI models")
    sub = parser.add_subparsers(dest="models_command", required=True)
    reg = sub.add_parser("register", help="register a model version from a JSON document, or the shipped models")
    reg.add_argument("file", nargs="?", help="the registration document (JSON), or - for standard input")
    reg.add_argument("--shipped", action="store_true", help="the shipped models' registrations (idempotent; as shadow)")
    reg.add_argument(
        "--status",
        choices=registry.STATUSES,
        help=f"register with this status (default: the document's, else {registry.DEFAULT_STATUS})",
    )
    listing = sub.add_parser("list", help="list registered model versions")
    listing.add_argument("--name", help="only this model")
    listing.add_argument("--status", choices=registry.STATUSES, help="only versions with this status")
    listing.add_argument("--json", action="store_true", help="print one JSON array")
    deploy = sub.add_parser("deploy", help="create or update the Ray Serve deployments of active/shadow models")
    commands = [reg, listing, deploy]
    for name, text in (("promote", "make active"), ("shadow", "run in shadow"), ("retire", "stop running")):
        each = sub.add_parser(name, help=f"{text} a model version")
        each.add_argument("name")
        each.add_argument("version")
        commands.append(each)
    for each in commands:
        each.add_argument("--data", help="data folder (default ./var, or HOUNSFIELD_DATA)")
        each.set_defaults(func=functools.partial(cmd_models, settings_of=settings_of))
