"""Which tier of ctprune's CPU kernels this machine runs: the same choice as the library's dispatch (csrc/cpu/
dispatch.cc), so the rewriter's speed decisions (rewrite/sparse_cost.py) use the calibration of the kernels that will
actually run.

    kernel_tier() -> "avx512" | "avx2" | "generic"
"""

from __future__ import annotations

import functools
import os

FORCE_ISA_ENV = "CTPRUNE_FORCE_ISA"
TIERS = ("avx512", "avx2", "generic")


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def detected_tier() -> str:
    """The best tier this CPU runs (the kernel table the library picks when nothing is forced)."""
    flags = _cpu_flags()
    if {"avx512f", "avx512vl", "avx2", "fma"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "generic"


def kernel_tier() -> str:
    """The tier the library will run: $CTPRUNE_FORCE_ISA when this CPU supports it (generic16 counts as generic),
    otherwise the detected one, as the library does."""
    forced = os.environ.get(FORCE_ISA_ENV, "")
    best = detected_tier()
    if forced in ("generic", "generic16"):
        return "generic"
    if forced == "avx2" and best in ("avx2", "avx512"):
        return "avx2"
    return best
