"""What every DIMSE handler needs, in one value: the server's parts, the identities, and the bridge from
pynetdicom's association threads to the server's event loop.

pynetdicom runs each association in its own thread and calls the event handlers there; the server's parts
(asyncpg pool, blob store, policy engine, audit trail) belong to the asyncio loop. `Node.run` submits a
coroutine to that loop with `asyncio.run_coroutine_threadsafe` and waits for its result in the association
thread, so the loop never blocks and many associations proceed at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from authz.actor import DIMSE, Actor
from authz.decision import PolicyEngine
from authz.principal import Principal
from dicomweb.dimse.config import ISSUER, DimseConfig

if TYPE_CHECKING:
    import asyncpg

    from authz.audit import AuditTrail
    from dicomweb.blobs import BlobStore
    from dicomweb.dimse.indexer import Indexer
    from dicomweb.ingest.service import StoreService
    from dicomweb.settings import DicomwebSettings

T = TypeVar("T")


class OperationTimeout(Exception):
    """The server did not finish an operation within the DIMSE timeout."""


@dataclass(frozen=True, slots=True)
class Node:
    loop: asyncio.AbstractEventLoop
    settings: DicomwebSettings
    pool: asyncpg.Pool
    store: StoreService
    blobs: BlobStore
    audit: AuditTrail
    policy: PolicyEngine
    indexer: Indexer | None = None
    """Early acknowledgement of C-STOREs (`HOUNSFIELD_DIMSE_EARLY_ACK`): the intake and the index store after the
    answer (`dicomweb.dimse.indexer`); None: stored before the answer."""

    @property
    def config(self) -> DimseConfig:
        return self.settings.dimse

    @property
    def timeout(self) -> float:
        return float(self.settings.dimse_timeout_seconds)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the server's loop from an association thread and return its result."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(self.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise OperationTimeout(f"no result within {self.timeout:.0f} s") from None

    def run_to_end(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the server's loop and wait for its end, without a timeout: for an ingest, whose outcome
        is known only once it ended (cancelled midway, it could still commit after a failure was answered). Its
        steps end by themselves: the blob store's and the database's."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def principal(self, calling_ae: str) -> Principal | None:
        """The identity of a configured calling AE title (PS3.8 7.1.1.4: the Calling AE Title)."""
        peer = self.config.peer(calling_ae)
        if peer is None:
            return None
        return Principal(sub=peer.sub, issuer=ISSUER, roles=peer.roles, client_id=peer.ae_title)

    def actor(self, principal: Principal, address: str | None) -> Actor:
        """The actor of an association's peer (`authz.actor`): the same policy as HTTP decides, with
        `context.channel = "dimse"`, and its records go to the same trail."""
        return Actor(principal, self.policy, self.audit, DIMSE, address)
