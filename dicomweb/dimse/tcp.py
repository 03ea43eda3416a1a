"""TCP settings of DIMSE connections: Nagle's algorithm off (TCP_NODELAY) on every association's socket, and a
listening port shared by the server's processes (SO_REUSEPORT).

A DIMSE message goes out as several small writes: the command set in one P-DATA-TF PDU, then the data set in
others (PS3.8 9.3.5, PS3.7 6.3.1), and a C-FIND response is a pending command and its identifier. With Nagle on,
the second small write waits until the first is acknowledged, and the peer delays that ACK (40 ms on Linux), so
each round trip of a query costs tens of milliseconds of waiting on an idle loopback. pynetdicom leaves its
sockets at the system default; `nodelay` is an `EVT_CONN_OPEN` handler that sets the option as soon as the
connection exists, for associations we accept (`service.build_ae`'s handlers) and those we request (C-MOVE
sub-associations, auto-routing). dcmtk's tools do the same when the `TCP_NODELAY` environment variable is 1.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from pynetdicom import evt
from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)


def set_nodelay(sock: socket.socket | None) -> None:
    """Turn Nagle's algorithm off on a connected TCP socket (a no-op for anything else)."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # the peer may already have gone: the association fails on its own
        log.debug("TCP_NODELAY not set: %s", exc)


def nodelay(event: Any) -> None:
    """EVT_CONN_OPEN: the association's socket is connected (acceptor) or has just connected (requestor)."""
    transport = getattr(event.assoc.dul, "socket", None)
    set_nodelay(getattr(transport, "socket", None))


NODELAY_HANDLERS: list[Any] = [(evt.EVT_CONN_OPEN, nodelay)]
"""`evt_handlers` for `AE.associate` / `AE.start_server`."""


class SharedPortServer(ThreadedAssociationServer):
    """An association server whose listening socket shares its port with the other processes of this server
    (`HOUNSFIELD_PROCESSES` > 1): SO_REUSEPORT, set before the bind, lets each process bind the same address, and
    the kernel spreads incoming connections over them. Only sockets of the same user may join such a port."""

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()
