"""A loopback-only network namespace for the test that runs in it, entered by the test's own thread.

Some peers bind every interface and have no option against it (Orthanc's HTTP and DICOM ports). Under
`loopback_namespace()` the calling thread is in a new network namespace (unshare(2) CLONE_NEWNET: it moves the
calling thread only) with only `lo`, brought up; every thread and process it starts meanwhile (the server
under test, the peer, the clients) shares that network, which nobody outside reaches. The PostgreSQL of the
test session is reached by its Unix socket, which no network namespace hides. On exit the thread goes back
(setns(2)) to its network: whatever it started in there must be stopped first.

Needs CAP_SYS_ADMIN (root, as CI runs the tests): without it the test fails with the reason, never skips.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _loopback_up() -> None:
    """`ip link set lo up`, by ioctl (SIOCSIFFLAGS) on a socket of the current namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(sock, SIOCGIFFLAGS, request)[:18])[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP))


@contextmanager
def loopback_namespace() -> Iterator[None]:
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        try:
            _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        except OSError as exc:
            if exc.errno == errno.EPERM:
                pytest.fail("a loopback-only network namespace needs CAP_SYS_ADMIN: run the tests as root")
            raise
        try:
            _loopback_up()
            yield
        finally:
            _check(_libc.setns(original, CLONE_NEWNET), "setns back to the original network namespace")
    finally:
        os.close(original)
