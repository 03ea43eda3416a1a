"""The remote policy engine: the same policies on an OPA server, through opa-python-client's async client.

Each decision is one call of OPA's Data API, `POST /v1/data/hounsfield/authz/decision` with `{"input": ...}`
(https://www.openpolicyagent.org/docs/rest-api#get-a-document-with-input); `?provenance=true` asks OPA to say
which bundle revisions answered. The server is loaded with the same folder (`opa run --server
authz/policies`, or a bundle built from it).

Fail closed: no answer within the timeout, a connection error, a non-2xx status or a body that is not JSON
raise `PolicyUnavailable` (503); a JSON answer without a well-formed decision is a denial
(`Decision.from_result`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from opa_client import AsyncOpaClient

from authz.decision import Decision, DecisionScope, PolicyInput
from authz.errors import PolicyUnavailable

log = logging.getLogger(__name__)

PACKAGE = "hounsfield.authz"
RULE = "decision"


def revision_from(body: dict[str, Any]) -> str | None:
    """`opa:<bundle>=<revision>,...` from an answer's provenance (OPA names the bundles that were active)."""
    provenance = body.get("provenance")
    bundles = provenance.get("bundles") if isinstance(provenance, dict) else None
    if not isinstance(bundles, dict) or not bundles:
        return None
    parts = []
    for name in sorted(bundles):
        info = bundles[name]
        revision = info.get("revision") if isinstance(info, dict) else None
        parts.append(f"{name}={revision}" if revision else str(name))
    return "opa:" + ",".join(parts)


class OpaEngine:
    """`PolicyEngine` asking an OPA server. The HTTP session opens on the first decision (it needs the loop)."""

    def __init__(self, url: str, timeout: float = 2.0, *, revision: str | None = None, retries: int = 1) -> None:
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = parts.scheme == "https"
        self._prefix = parts.path.rstrip("/")
        self._retries = retries
        self._revision = revision or f"opa:{self.url}"
        self._client: AsyncOpaClient | None = None
        self._stack = contextlib.AsyncExitStack()
        self._opening = asyncio.Lock()

    @property
    def decision_scope(self) -> DecisionScope:
        """`instance`: the server's policy is not read here, so no decision is reused across instances."""
        return "instance"

    @property
    def revision(self) -> str:
        """The bundle revisions OPA reported with its last answer, else the configured string."""
        return self._revision

    async def _open(self) -> AsyncOpaClient:
        async with self._opening:
            if self._client is None:
                client = AsyncOpaClient(
                    host=self._host,
                    port=self._port,
                    ssl=self._ssl,
                    timeout=self.timeout,
                    retries=self._retries,
                )
                if self._prefix:  # OPA behind a path on a gateway: http://gw/opa -> http://gw/opa/v1
                    client.root_url = f"{'https' if self._ssl else 'http'}://{self._host}:{self._port}{self._prefix}/v1"
                self._client = await self._stack.enter_async_context(client)
            return self._client

    async def query(self, document: dict[str, Any]) -> Any:
        """The raw JSON answer of OPA for an input document; raises `PolicyUnavailable`."""
        client = await self._open()
        try:
            async with asyncio.timeout(self.timeout):
                return await client.query_rule(
                    input_data=document,
                    package_path=PACKAGE,
                    rule_name=RULE,
                    query_params={"provenance": "true"},
                )
        except TimeoutError:
            raise PolicyUnavailable(f"OPA did not answer within {self.timeout:g} s") from None
        except aiohttp.ClientResponseError as exc:
            raise PolicyUnavailable(f"OPA answered {exc.status} {exc.message}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise PolicyUnavailable(f"OPA unreachable: {exc.__class__.__name__}: {exc}") from None
        except ValueError:
            raise PolicyUnavailable("OPA answered with a body that is not JSON") from None

    async def decide(self, policy_input: PolicyInput) -> Decision:
        body = await self.query(policy_input.to_dict())
        if not isinstance(body, dict):
            return Decision(False, ("OPA answered with no decision",), revision=self._revision)
        revision = revision_from(body)
        if revision is not None:
            self._revision = revision
        decision = Decision.from_result(body.get("result"), self._revision)
        decision_id = body.get("decision_id")
        if isinstance(decision_id, str) and decision_id:
            decision = dataclasses.replace(decision, decision_id=decision_id)
        return decision

    async def reload(self) -> None:
        """Nothing to do here: OPA loads its policies and bundles itself."""

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None
