"""glibc's malloc tuned for a merge's allocation pattern (Linux with glibc only; else a no-op).

A merge allocates and frees the same few sizes for every tensor: input buffers, 8 MB float32
blocks, outputs. glibc serves anything above its (dynamic) mmap threshold with a fresh
``mmap`` and returns freed heap tops to the system, so each of those buffers is page-faulted
and zeroed again, tensor after tensor: ~1M page faults and a third of the CPU time in the
kernel for a TIES merge of two 1.7 GB models. Serving up to 32 MB (glibc's largest mmap
threshold) from the heap and keeping freed memory for reuse cut the faults 3x and the merge's
time by 15-40% (benchmarks/README.md).
"""

from __future__ import annotations

import ctypes
import platform
import sys
import threading
from contextlib import contextmanager

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
_DEFAULT = 128 * 1024  # glibc's initial value of all three

_TUNED = {
    M_MMAP_THRESHOLD: 32 * 1024**2,  # the largest glibc accepts on 64-bit systems
    M_TRIM_THRESHOLD: 1 << 32,  # keep freed memory for the next tensor's buffers
    # grow a heap in large steps: fewer extensions (as many page faults saved as with 256 MB,
    # and each thread's arena keeps less: 256 MB raised a small merge's peak by 30%)
    M_TOP_PAD: 64 * 1024**2,
}


def _mallopt():
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None


_lock = threading.Lock()
_held = {"merges": 0, "mallopt": None}


@contextmanager
def reuse_freed_memory():
    """Run the block with the settings above. Merges overlapping in several threads share
    them: the first one in sets them, the last one out sets glibc's initial values back (its
    dynamic mmap threshold stays off: glibc has no call to turn it back on)."""
    with _lock:
        if _held["merges"] == 0:
            _held["mallopt"] = mallopt = _mallopt()
            for param, value in _TUNED.items():
                if mallopt is not None:
                    mallopt(ctypes.c_int(param), ctypes.c_int(min(value, 2**31 - 1)))
        _held["merges"] += 1
    try:
        yield
    finally:
        with _lock:
            _held["merges"] -= 1
            mallopt = _held["mallopt"]
            if _held["merges"] == 0 and mallopt is not None:
                for param in _TUNED:
                    mallopt(ctypes.c_int(param), ctypes.c_int(_DEFAULT))
