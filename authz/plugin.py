"""Authentication, authorization and audit as a plugin: every route needs a valid token (the authn middleware)
and a policy decision (the app-wide guard), declared per route by `authz_opt`. It opens the policy engine (with
its decision cache), the audit trail (on connections of its own), the anchors signed checkpoints are copied to,
the break-glass service and its session cache; it handles the checkpoint and break-glass alert jobs.

Dependencies: `audit` (AuditTrail), `policy` (PolicyEngine), `breakglass` (BreakGlassService), `anchors`
(AuditAnchors)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from authz import keys
from authz import routes_breakglass as breakglass_routes
from authz.audit import CHECKPOINT_JOB, AuditTrail, checkpoint_handler, key_signer, key_verifier
from authz.auditanchor import AuditAnchors, open_anchors
from authz.auditsyslog import SyslogForwarder
from authz.authn import authenticate
from authz.breakglass import ALERT_JOB, BreakGlassService, alert_handler
from authz.decision import PolicyEngine
from authz.decision_cache import CachingEngine
from authz.engines import open_engine
from authz.facts import FactsSource
from authz.factscache import FactsCache
from authz.guard import authorize
from authz.services import STATE_KEY, AuthzServices
from authz.sessioncache import SessionCache
from authz.settings import AuthzSettings
from server.platform.database import DatabasePlugin
from server.platform.plugin import JobSet, Periodic, ServicePlugin, opened

if TYPE_CHECKING:
    from litestar.config.app import AppConfig
    from litestar.datastructures import State

AUDIT_WRITER_CONNECTIONS = 2
"""The audit writer's own connections: appends never wait behind the callers' checkouts; a writer that ends hands
over to the next, so two may overlap."""


class AuthzPlugin(ServicePlugin):
    def __init__(self, settings: AuthzSettings, database: DatabasePlugin, facts: FactsSource) -> None:
        self.settings = settings
        self.database = database
        self.facts = facts
        """What the policy decides on about a stored study (the archive's index answers)."""
        self._services: AuthzServices | None = None
        self._anchors: AuditAnchors | None = None
        self._jobs = JobSet()

    @property
    def services(self) -> AuthzServices:
        return opened(self._services, "authorization")

    @property
    def audit(self) -> AuditTrail:
        return self.services.audit

    @property
    def policy(self) -> PolicyEngine:
        return self.services.policy

    @property
    def anchors(self) -> AuditAnchors:
        return opened(self._anchors, "the audit anchors")

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        app_config.middleware.append(authenticate(self.settings))  # 401 before any route runs
        app_config.guards.append(authorize)
        return super().on_app_init(app_config)

    def route_handlers(self) -> Iterable[Any]:
        return breakglass_routes.ROUTES

    def dependencies(self) -> Mapping[str, Callable[[], Any]]:
        return {
            "audit": lambda: self.audit,
            "policy": lambda: self.policy,
            "breakglass": lambda: self.services.breakglass,
            "anchors": lambda: self.anchors,
        }

    def jobs(self) -> JobSet:
        return self._jobs

    def publish(self, state: State) -> None:
        state[STATE_KEY] = self.services

    async def open(self, stack: contextlib.AsyncExitStack) -> None:
        settings, pool = self.settings, self.database.pool
        forwarder = SyslogForwarder(settings.audit_syslog) if settings.audit_syslog else None
        if forwarder is not None:
            stack.push_async_callback(forwarder.close)
        writer = await self.database.own_pool(stack, 1, AUDIT_WRITER_CONNECTIONS)
        audit = AuditTrail(pool, forwarder=forwarder, writer=writer)
        stack.push_async_callback(audit.close)  # runs before the pools close: records in flight are written
        policy = CachingEngine(
            open_engine(settings), ttl=settings.policy_cache_seconds, entries=settings.policy_cache_entries
        )
        stack.push_async_callback(policy.close)
        signing_key = await anyio.to_thread.run_sync(keys.load_or_create, settings.data_dir)
        anchors = self._anchors = open_anchors(settings, forwarder)  # checkpoints copied out of the database's reach
        stack.push_async_callback(anchors.close)
        sessions = SessionCache(self.database.url)
        await sessions.start()
        stack.push_async_callback(sessions.close)
        facts = FactsCache(self.database.url, self.facts)  # invalidated by the index's notifications
        await facts.start()
        stack.push_async_callback(facts.close)
        breakglass = BreakGlassService(
            pool, audit, minutes=settings.break_glass_minutes, webhook=settings.break_glass_webhook, sessions=sessions
        )
        self._services = AuthzServices(pool, facts, policy, audit, breakglass, sessions, settings.auth_public_paths)
        stack.callback(functools.partial(setattr, self, "_services", None))
        checkpoint = checkpoint_handler(
            pool,
            key_signer(signing_key.private_pem, signing_key.kid),
            settings.audit_checkpoint_seconds,
            anchors=anchors,
            verifier=key_verifier({signing_key.kid: signing_key.public_jwk}),
        )
        self._jobs = JobSet(
            handlers={CHECKPOINT_JOB: checkpoint, ALERT_JOB: alert_handler(pool, settings)},  # alerts: webhooks
            periodic=[Periodic(CHECKPOINT_JOB, settings.audit_checkpoint_seconds)],
        )
