"""Which tier of ctprune's CPU kernels this machine runs: the same choice as the library's dispatch (csrc/cpu/
dispatch.cc), so the rewriter's speed decisions (rewrite/sparse_cost.py) use the calibration of the kernels that will
actually run.

    kernel_tier() -> "avx512" | "avx2" | "generic"
    cpu_model()   -> "zen3" | "zen4" | "zen5" | None   (where one tier's speed differs by core: calibration variants)
    for_this_cpu(table, tier=None, default=...)   -> the entry of a table keyed by tier (and "tier/core") that applies
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")

FORCE_ISA_ENV = "CTPRUNE_FORCE_ISA"
TIERS = ("avx512", "avx2", "generic")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _flags(info: dict[str, str]) -> frozenset[str]:
    return frozenset(info.get("flags", "").split())


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    return _flags(_cpuinfo())


def cpu_model() -> str | None:
    """The AMD core generation, where the rewriter's calibrations tell them apart: one AVX-512 tier runs on Zen 4
    (512-bit work in two 256-bit halves; onnxruntime's dense Conv about 110 GFLOP/s on one core) and on Zen 5 (full
    width, 190-270 GFLOP/s), and the two need different break-even densities. None for anything else."""
    info = _cpuinfo()
    if info.get("vendor_id") != "AuthenticAMD":
        return None
    try:
        family = int(info.get("cpu family", ""))
    except ValueError:
        return None
    if family == 0x1A:
        return "zen5"
    if family == 0x19:  # Zen 3 and Zen 4 share the family; of the two only Zen 4 has AVX-512
        return "zen4" if "avx512f" in _flags(info) else "zen3"
    return None


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


_MISSING = object()


def for_this_cpu(table: Mapping[str, T], tier: str | None = None, default=_MISSING) -> T:
    """table[tier] for a named tier. For the tier this machine runs (tier None), the entry of its core generation
    ("avx512/zen4") where the table was measured there, else the tier's. `default` for a tier the table lacks
    (KeyError without one)."""
    if tier is None:
        tier = kernel_tier()
        variant = f"{tier}/{cpu_model()}"
        if variant in table:
            return table[variant]
    if tier not in table and default is not _MISSING:
        return default
    return table[tier]
