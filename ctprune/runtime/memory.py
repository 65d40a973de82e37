"""Handing freed memory back to the system between the stages of a run.

glibc's malloc keeps what a stage freed in its heaps (allocations under its mmap threshold, up to 32 MB, and
fragments of larger ones), so a process's resident size only grows: after VGG-19's selection ~350 MB that nothing
uses stay resident into the next stage, where onnxruntime builds a session on top of them. `malloc_trim(0)` returns
the free pages; elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["release_freed_memory"]


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Give the allocator's free pages back to the system (a few ms; what the stage dropped is freed already: its
    tensors and arrays hold no reference cycles)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
