"""glibc malloc settings: freed activations kept for the next pass, and, for servers that must
stay small, fewer arenas (--malloc-arenas, opt-in).

A forward pass allocates its activations (up to 12 MB each for one 352 px image) and frees them
at its end. By default glibc hands such blocks back to the kernel: those above its mmap
threshold are unmapped, and the top of a heap is trimmed once more than twice that is free. The
next pass then faults every page in again, zeroed by the kernel: in `perf`, a quarter of a
single-threaded compiled pass was page faults and page clearing. Keeping freed memory
(`keep_freed_memory`) took the static batch-1 package from 53-59 to 36-41 ms a pass on the
2-core AMD EPYC, three alternating runs of 60 passes each; resident memory is what the passes
need anyway.

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

# From glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# glibc's largest mmap threshold on 64-bit: blocks below it come from the heap and are reused.
KEEP_BELOW = 32 << 20
# Free memory a heap keeps at its top before trimming: more than a pass of the default model frees.
TRIM_ABOVE = 128 << 20


def keep_freed_memory(environ: dict | None = None) -> bool:
    """Keep freed blocks for reuse instead of handing them back to the kernel after every pass;
    True if applied. Leaves the choice to an operator who set glibc's thresholds."""
    environ = os.environ if environ is None else environ
    if not sys.platform.startswith("linux"):
        return False
    tunables = environ.get("GLIBC_TUNABLES", "")
    if any(name in environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")) or \
            "mmap_threshold" in tunables or "trim_threshold" in tunables:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a C library without mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BELOW)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE))


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
