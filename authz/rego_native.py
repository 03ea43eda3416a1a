"""regopy (rego-cpp), loaded so that it shares the process's C++ allocator. Import regopy from here, never directly.

The regopy wheel's `librego_shared.so` carries snmalloc's replacements of the C++ `operator new` and `operator
delete` and exports them. An ELF library's references are resolved in the global scope first, then among the
library and its own dependencies (System V ABI; dlopen(3)); ctypes loads it locally, so rego-cpp's inline `new`
and `delete` bind to its snmalloc copies. The out-of-line parts of libstdc++ (string growth, streams, ...) bind
once, when libstdc++ itself is loaded: to rego-cpp's operators when rego-cpp brought it in, to glibc's malloc when
another C++ extension did (numpy and the image codecs, imported before the policy engine in the server). In that
second case memory that libstdc++ allocated with malloc is released by rego-cpp through snmalloc, which never
gives it back: every policy evaluation lost tens of kilobytes, and the server's resident size grew without bound.

Loading libstdc++ into the global scope before rego-cpp makes every C++ reference of rego-cpp resolve to
libstdc++'s own operators, whatever was imported first: one allocator for all the C++ code of the process
(tests/server/test_memory.py measures it). Nothing to do where there is no libstdc++ to load (not glibc Linux).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

LIBSTDCXX = "libstdc++.so.6"
"""The soname `librego_shared.so` names in its DT_NEEDED (manylinux wheels take it from the system)."""


def share_cxx_allocator() -> bool:
    """Put libstdc++ in the process's global symbol scope (loading it, or promoting the copy already loaded).
    Must run before `librego_shared.so` is loaded; False where it cannot (then rego-cpp keeps its own operators)."""
    if not sys.platform.startswith("linux"):
        return False
    if "regopy.rego_shared" in sys.modules:
        log.warning("regopy was imported before authz.rego_native: its C++ allocator is not shared")
        return False
    try:
        ctypes.CDLL(LIBSTDCXX, mode=os.RTLD_GLOBAL | os.RTLD_NOW)
    except OSError:
        return False
    return True


SHARED = share_cxx_allocator()
"""Whether rego-cpp was loaded with the process's C++ allocator."""

import regopy  # noqa: E402 - must come after share_cxx_allocator()
from regopy import rego_shared  # noqa: E402

__all__ = ["SHARED", "rego_shared", "regopy"]
