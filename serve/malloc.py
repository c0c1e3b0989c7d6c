"""glibc malloc settings, for servers that must stay small (--malloc-arenas, opt-in).

glibc gives each thread that allocates concurrently an arena of its own, up to eight per core,
and every thread keeps the decode buffers and activations it freed in its own arena, so
resident memory grows with the thread count long after the work is done. Fewer arenas let
threads reuse each other's freed memory, at the price of contending for their locks. Measured
on two cores after phone photos at eight concurrent clients: one arena 336 MiB resident, two
355 MiB, glibc's default 465 MiB; but throughput at eight clients fell by a quarter with one
arena, so the default leaves glibc alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_ARENA_MAX = -8  # from glibc's malloc.h


def limit_arenas(count: int = 1, environ: dict | None = None) -> bool:
    """Ask glibc for at most `count` arenas; True if applied. Must run before the threads that
    allocate start. Leaves the choice to the operator who set MALLOC_ARENA_MAX or the tunable."""
    environ = os.environ if environ is None else environ
    if not sys.platform.startswith("linux"):
        return False
    if "MALLOC_ARENA_MAX" in environ or "glibc.malloc.arena_max" in environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a C library without mallopt
        return False
    return bool(mallopt(M_ARENA_MAX, count))


def release_free_memory() -> bool:
    """Hand memory that malloc holds free back to the system (glibc's malloc_trim), e.g. once a
    replaced model is gone: freed blocks below the mmap threshold otherwise stay in the heap and
    its arenas. True if glibc did release something."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(trim(0))
