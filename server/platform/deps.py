"""The platform's dependencies as route handlers declare them (Litestar named dependencies: the parameter's name
picks the provider, which the platform's plugins register)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, TypeAlias, TypeVar

import asyncpg
from litestar.di import NamedDependency

from server.platform.dbwatch import DatabaseHealth
from server.platform.diskspace import FreeSpace

T = TypeVar("T")

if TYPE_CHECKING:
    Provided: TypeAlias = Annotated[T, "named dependency"]
else:

    class Provided:
        """`Provided[T]`: a named dependency of type `T` for the type checker, taken as it is at run time. What a
        plugin provides is an object the server built (a service, the settings), never request input: a
        signature model would only re-check it on every request, and cannot check a Protocol (a policy engine,
        a blob store) or the settings' union class (`server.settings.Settings`) against one package's section."""

        def __class_getitem__(cls, _item: Any) -> Any:
            return NamedDependency[Any]


PoolDep: TypeAlias = Provided[asyncpg.Pool]
"""`pool`: the serving database pool (`server.platform.database`)."""
DatabaseHealthDep: TypeAlias = Provided[DatabaseHealth]
"""`database`: whether the database is within reach, for /readyz."""
SpaceDep: TypeAlias = Provided[FreeSpace]
"""`space`: the free-space watermark of the volumes the server writes to."""
