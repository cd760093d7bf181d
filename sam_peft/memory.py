"""CPU memory: give large tensors straight back to the operating system (glibc's malloc, Linux).

glibc serves an allocation above its mmap threshold with its own mapping and unmaps it on free, but it raises
that threshold (up to 32 MB) each time such a block is freed. After the first large free, the decoder's
1-8 MB activations come from the heap instead, which fragments and keeps what was freed: one training step
of the demo (2 slices x 3 regions, LiteMedSAM decoder on the CPU) peaked 930 MB above its start and kept
780 MB afterwards; with the threshold fixed at 1 MB (which also stops the adjustment) it peaked 430 MB above
and kept 30 MB. `sam-peft` sets this at start; Python users can call `return_large_blocks()` themselves or
set the environment variable MALLOC_MMAP_THRESHOLD_ before starting Python.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
LARGE_BLOCK = 1 << 20


def return_large_blocks(threshold: int = LARGE_BLOCK) -> bool:
    """Serve allocations of `threshold` bytes and more by mmap, returned on free. False where this is not
    glibc, or where MALLOC_MMAP_THRESHOLD_ already chose a threshold (the user's setting wins)."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # no C library by that name, or one without mallopt (musl)
        return False
