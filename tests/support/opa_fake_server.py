"""A FAKE OPA server for tests: an aiohttp server on 127.0.0.1 that speaks the part of OPA's Data API our
client uses (`POST /v1/data/<path>` with `{"input": ...}` -> `{"result": ..., "decision_id", "provenance"}`,
`GET /health`), also under `/opa` as if behind a gateway. There is no OPA binary on this machine, so it
evaluates the same policy files with regopy; what it tests is our HTTP client path (status codes, timeouts,
malformed answers), not OPA itself.

`server.mode` makes it misbehave: "ok", "slow" (answers after `slow_seconds`), "error" (500), "not-json",
"malformed" (`{"result": {"allow": "yes"}}`), "undefined" (`{}`, OPA's answer for an undefined document),
"not-object" (a JSON array).
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

from authz.engine_rego import RegoEngine


class FakeOpaServer:
    def __init__(self, policy_dir: Path, data_file: Path | None, *, bundle_revision: str = "rev-1") -> None:
        self.engine = RegoEngine(policy_dir, data_file)
        self.bundle_revision = bundle_revision
        self.mode = "ok"
        self.slow_seconds = 1.0
        self.requests: list[dict[str, Any]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._release = asyncio.Event()

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/data/{path:.*}", self._data)
        app.router.add_post("/opa/v1/data/{path:.*}", self._data)  # as if behind a gateway at /opa
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _data(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        path = request.match_info["path"].strip("/")
        self.requests.append({"path": path, "query": dict(request.query), "body": body})
        if self.mode == "slow":
            try:
                await asyncio.wait_for(self._release.wait(), self.slow_seconds)
            except TimeoutError:
                pass
        elif self.mode == "error":
            return web.json_response({"code": "internal_error", "message": "boom"}, status=500)
        elif self.mode == "not-json":
            return web.Response(text="<html>gateway</html>", content_type="text/html")
        elif self.mode == "malformed":
            return web.json_response({"result": {"allow": "yes"}})
        elif self.mode == "undefined":
            return web.json_response({})
        elif self.mode == "not-object":
            return web.json_response([1, 2])
        answer: dict[str, Any] = {"decision_id": str(uuid.uuid4())}
        if path == "hounsfield/authz/decision":
            answer["result"] = self.engine.evaluate(body.get("input", {}))
        if request.query.get("provenance", "").lower() == "true":
            answer["provenance"] = {"version": "fake", "bundles": {"authz": {"revision": self.bundle_revision}}}
        return web.json_response(answer)
