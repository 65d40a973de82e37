"""Would a PatternConv beat onnxruntime's dense Conv on this layer? The 3x3 counterpart of sparse_cost.py.

    pattern_beats_dense(compact)          -> (bool, density, estimated speedup)
    estimated_speedup(density, share)     -> float (dense time / PatternConv time)
    break_even_density(blocked=False)     -> float (the densest layer that still gains MARGIN)

PatternConv's CPU kernel runs a layer in two ways (BENCHMARKS.md, "PatternConv block path"): filters whose kernel
lists coincide and stand next to each other (`--block 16`) 16 at a time, every input load feeding 32 multiply-adds
(the block path); every other filter alone, one multiply-add per load (the per-filter path). Time relative to the dense
Conv is FIXED + SLOPE * density for each path, density = 4 * kept kernels / (O * C * 9), and a layer's estimate weighs
the two paths by the share of its kept kernels in blocks.

Constants per kernel tier (the tier this machine runs, runtime/cpu.kernel_tier): the upper envelope of the product
kernel's time over the dense Conv's (the slowest benchmark layer at each ratio), 1 thread, batch 1, two seeds:

    python -m ctprune.lab.bench_layers --block 16 --ratios 2.25 4 8 --threads 1 --batch 1 --seed 0   # and --seed 1
    python -m ctprune.lab.bench_layers --quick --threads 1 --ratios 2.25 4 8                          # per filter

- AVX2 (AMD EPYC Zen 3): per filter (block path off) 0.63x at density 4/9 (patterns alone), 1.25x at 1/4, 2.82x at
  1/8: time -0.128 + 3.86 * density, so a layer denser than 0.27 gains less than MARGIN and stays a dense Conv;
  blocks of 16: 1.58x, 2.59x, 4.78x at the same densities: 0.055 + 1.33 * density, faster at every pattern density.
  The portable tier (no faster than AVX2) uses these.
- AVX-512 (AMD EPYC Zen 5, whose onnxruntime dense Conv runs at 190-270 GFLOP/s on one core, 2.5x Zen 3's): per
  filter 0.62x, 1.09x, 2.07x (256@8 and 512@7 the slowest; 64@56-256@14 0.84-0.91x, 1.43-1.59x, 2.7-2.9x): time
  0.06 + 3.5 * density, so layers sparser than 0.243 (about 4x) become PatternConvs; on output planes under 49
  pixels (512@4) 0.49x, 0.69x, 1.30x: 0.1 + 5.5 * density (sparser than 0.147, about 7x); blocks of 16: 1.32x,
  2.22x, 3.56x: 0.09 + 1.52 * density. These are the tier's constants wherever no variant below fits.
- AVX-512 on Zen 4 ("avx512/zen4": the same kernels; onnxruntime's dense Conv about 110 GFLOP/s on one core, so
  the load-bound per-filter path loses less to it): per filter (256@8 the slowest) 0.91x, 1.54x, 2.85x: 0.05 + 2.42
  * density (sparser than 0.355, about 2.8x); planes under 49 pixels (512@4) 0.57x, 1.04x, 2.05x: 3.95 * density;
  blocks of 16 (512@7 and 64@56 the slowest): 1.53x, 2.72x, 4.74x: 0.04 + 1.39 * density.
Two threads: the block path's best-of speedups at 8x were as on one thread (AVX2); the estimate is not scaled.
"""

from __future__ import annotations

import numpy as np

from ctprune.rewrite.pattern_conv import CompactPatternWeights
from ctprune.rewrite.sparse_cost import MARGIN
from ctprune.runtime.cpu import for_this_cpu

KEEP, TAPS = 4, 9
BLOCK = 16  # filters the block path computes together
PADDED_FROM = 9  # a run's remainder of this many filters or more runs as a padded block (csrc/cpu/pattern_conv_plan.cc)
# per tier: (FIXED, SLOPE) of the per-filter path and of the block path, time over the dense Conv's; "small": the
# per-filter path on output planes of fewer than SMALL_PLANE pixels, where a tile holds a few vectors (AVX-512: 4x4)
CALIBRATIONS = {
    "avx2": {"per_filter": (-0.128, 3.86), "blocked": (0.055, 1.33)},
    "avx512": {"per_filter": (0.06, 3.5), "small": (0.1, 5.5), "blocked": (0.09, 1.52)},
}
CALIBRATIONS["avx512/zen4"] = {"per_filter": (0.05, 2.42), "small": (0.0, 3.95), "blocked": (0.04, 1.39)}
CALIBRATIONS["generic"] = CALIBRATIONS["avx2"]
SMALL_PLANE = 49
LEAST_TIME = 0.1  # the per-filter fit's intercept is below zero: no layer is more than 10x faster than dense


def block_share(compact: CompactPatternWeights) -> float:
    """The share of kept kernels the block path computes: runs of consecutive filters (storage order) with identical
    kernel lists, in blocks of 16 and a remainder of 9 or more, as the kernel's plan finds them."""
    filters = np.asarray(compact.kernel_filters)
    if filters.size == 0:
        return 0.0
    starts = np.flatnonzero(np.r_[True, filters[1:] != filters[:-1]])
    ends = np.r_[starts[1:], filters.size]
    lists = [(tuple(compact.kernel_channels[s:e]), tuple(compact.kernel_patterns[s:e])) for s, e in zip(starts, ends)]
    blocked, run = 0, 1
    for i in range(1, len(lists) + 1):
        if i < len(lists) and lists[i] == lists[i - 1]:
            run += 1
            continue
        in_blocks = run - run % BLOCK + (run % BLOCK if run % BLOCK >= PADDED_FROM else 0)
        blocked += in_blocks * (ends[i - 1] - starts[i - 1])
        run = 1
    return blocked / filters.size


def plane_pixels(shape) -> int | None:
    """H * W from a shape ending in (H, W) ((N, C, H, W) or (C, H, W)) when both are known, else None."""
    if shape is None or len(shape) < 2 or not all(isinstance(d, int) and d > 0 for d in shape[-2:]):
        return None
    return int(shape[-2]) * int(shape[-1])


def calibration(tier: str | None = None) -> dict:
    """The constants of `tier`, or of what this machine runs (runtime/cpu.for_this_cpu: "avx512/zen4" on a Zen 4)."""
    return for_this_cpu(CALIBRATIONS, tier)


def _per_filter(cal: dict, pixels: int | None) -> tuple[float, float]:
    """The per-filter constants for an output plane of `pixels` (None: not known, the small planes' when the tier
    has them, which are the slower)."""
    small = pixels is None or pixels < SMALL_PLANE
    return cal["small"] if small and "small" in cal else cal["per_filter"]


def estimated_speedup(density: float, share: float = 0.0, tier: str | None = None, pixels: int | None = None) -> float:
    """Dense Conv time over PatternConv time for a layer of this density with `share` of its kept kernels in blocks,
    on `tier` (default: what this machine runs, `calibration`), whose output plane has `pixels` (OH * OW)."""
    cal = calibration(tier)
    fixed, slope = _per_filter(cal, pixels)
    per_filter = max(LEAST_TIME, fixed + slope * density)
    blocked = max(LEAST_TIME, cal["blocked"][0] + cal["blocked"][1] * density)
    return 1.0 / (share * blocked + (1.0 - share) * per_filter)


def break_even_density(blocked: bool = False, tier: str | None = None, pixels: int | None = None) -> float:
    """The largest density at which a PatternConv of single filters (or of whole blocks) still beats the dense Conv
    by MARGIN on `tier` for an output plane of `pixels`: the allocation spends no budget above it
    (pruning/layers.py). 4/9 when it always does."""
    cal = calibration(tier)
    fixed, slope = cal["blocked"] if blocked else _per_filter(cal, pixels)
    return float(min(KEEP / TAPS, max(0.0, (1.0 / MARGIN - fixed) / slope)))


def pattern_beats_dense(compact: CompactPatternWeights, tier: str | None = None,
                        pixels: int | None = None) -> tuple[bool, float, float]:
    """(PatternConv expected at least MARGIN faster, the layer's density, the estimated speedup); `pixels`: the
    output plane's OH * OW where known."""
    o, c = compact.weight_shape[:2]
    density = KEEP * len(compact.weights) / max(1, o * c * TAPS)
    speedup = estimated_speedup(density, block_share(compact), tier, pixels)
    return speedup >= MARGIN, density, speedup
