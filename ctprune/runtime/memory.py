"""Handing freed memory back to the system between the stages of a run.

glibc's malloc keeps what a stage freed in its heaps (allocations under its mmap threshold, up to 32 MB, and
fragments of larger ones), so a process's resident size only grows: after VGG-19's selection ~350 MB that nothing
uses stay resident into the next stage, where onnxruntime builds a session on top of them. `malloc_trim(0)` returns
the free pages; elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools

__all__ = ["map_large_blocks", "release_freed_memory"]

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@functools.lru_cache(maxsize=2)
def _libc_function(name: str):
    lib = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(lib), name) if lib else None
    except (OSError, AttributeError):  # not glibc
        return None


@contextlib.contextmanager
def map_large_blocks(threshold: int = 1 << 20):
    """Inside: every allocation of `threshold` bytes or more gets its own mapping, unmapped when freed. By default
    glibc raises its mmap threshold to the size of each large block freed (up to 32 MB), and blocks of 1-32 MB then
    come from the heap, whose fragments stay resident: 70-80 MB of VGG-19's `--epochs 0` peak (1.58-1.60 GB against
    1.51 GB with this, same run time). For runs without training, which make few such allocations (a fine-tune
    allocates activations of that size every step). On exit the threshold goes to 32 MB, where glibc's own
    adjustment ends up after the first large free (setting it once turns that adjustment off)."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        yield
        return
    mallopt(M_MMAP_THRESHOLD, int(threshold))
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, 32 << 20)


def release_freed_memory() -> None:
    """Give the allocator's free pages back to the system (a few ms; what the stage dropped is freed already: its
    tensors and arrays hold no reference cycles)."""
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)
