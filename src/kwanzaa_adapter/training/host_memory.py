"""The host heap: keep a CPU training run's resident memory at its working set.

glibc serves a large allocation with its own `mmap` (returned to the OS when freed) only above a
threshold, and it raises that threshold to the size of every such block freed, up to 32 MiB. After
the first steps, the activations of a training step (a few MB each, of sizes that change with every
sequence length) therefore come from the heap, which fragments and keeps freed pages resident: the
process's resident memory grows step after step although the tensors alive at any time do not
(bench/NOTES.md). `malloc_trim` hands the heap's free pages back; once per optimizer step it costs
little, since a step reuses its own freed blocks before the next trim.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, looked up once; None elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def can_release_free_heap() -> bool:
    """Whether `release_free_heap` can act here (glibc); elsewhere it does nothing."""
    return _malloc_trim() is not None


def release_free_heap() -> bool:
    """Return the heap's free pages to the OS (glibc `malloc_trim(0)`); False where there is no glibc."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
