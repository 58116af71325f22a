"""The host allocator: keep a CPU training run's resident memory at its working set.

glibc serves a large allocation with its own `mmap` (returned to the OS when freed) only above a
threshold, and it raises that threshold to the size of every such block freed, up to 32 MiB. After
the first steps, the activations of a training step (a few MB each, of sizes that change with every
sequence length) therefore come from the heap, which fragments: the process's resident memory grows
step after step although the tensors alive at any time do not (bench/NOTES.md). A fixed threshold
stops the growth, at the cost of page faults on each large allocation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h); setting it also turns off the dynamic threshold


def fix_mmap_threshold(threshold_bytes: int) -> bool:
    """Have glibc `mmap` every allocation of `threshold_bytes` or more; False where libc is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        log.info("host allocator left as it is: no glibc mallopt on this system")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold_bytes) == 1
