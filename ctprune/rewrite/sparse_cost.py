"""Would a SparseConv beat onnxruntime's dense op on this layer? A cost model calibrated per kernel tier (AVX-512,
AVX2: CALIBRATIONS below; the tier is the one the library will run, runtime/cpu.py).

    sparse_beats_dense(kind, weight_shape, input_hw, stride, density, block, threads=1) -> bool
    estimated_speedup(...)                                                              -> float (dense time / sparse time)
    break_even_density(...)                                                             -> float

kind: "conv" (weight (O, Cg, kh, kw), input_hw = (H, W) of the input) or "fc" (weight (O, I), input_hw ignored).
density: kept weights / dense weights of the layer. The rewriter keeps a layer dense (holding its zeros) when
sparse_beats_dense says False.

The model: SparseConv time / dense time = FIXED + SLOPE * density. FIXED is what the sparse kernel pays whatever it
keeps (writing the output, the epilogue, the loop over blocks and tiles: large when a layer has few input channels or
a large image, so each output has little work), SLOPE the cost of the kept multiply-adds relative to the dense op's.
Constants are conservative fits (upper envelope, so a layer is kept sparse only where it was faster on every shape
measured like it). The AVX-512 tier's, to (BENCHMARKS.md, "SparseConv"; batch 1, Xeon with AVX-512, onnxruntime 1.32):

    python -m ctprune.lab.bench_layers --sparse --threads 1 --ratios 2 4 8 16 --blocks 4 8 --kinds conv
    python -m ctprune.lab.bench_layers --sparse --kinds general --threads 1 2 --ratios 2 4 8 16 --blocks 4 8
    python -m ctprune.lab.bench_layers --sparse --threads 2 --ratios 4 8 --blocks 8 --kinds conv fc

- 1x1 stride 1, per layer fits of 1/speedup over density: FIXED 0.01-0.62 (median 0.3; >= 0.45 on C <= 64 or H*W >=
  3136), SLOPE 0.3-1.9 (median 0.85); every one of the 22 shapes faster than dense from 2x on (block 4 and 8).
- 1x1 stride 2 (subsampled into aligned planes, then the 1x1 path): FIXED <= 0.21, SLOPE <= 1.0.
- every other Conv (kxk, grouped, dilated, strided kxk: packed planes, shifted unaligned reads): FIXED falls with the
  dense multiply-adds per output K = Cg * kh * kw (K 288: 0.53-0.72, 576: 0.49, 896: 0.23, 1600: 0.14), about 300 / K
  capped at 0.75; SLOPE <= 1.45 (grouped <= 1.02).
- 2 threads: onnxruntime's dense op gains more from the second core than SparseConv does (1x1 at 8x: median 2.9x on
  1 thread, 1.8x on 2): the costs are scaled by THREADS_FACTOR (FIXED, SLOPE); the general path's 2-thread slope is
  twice its 1-thread one, and grouped 3x3 layers were slower than dense at 16x on 2 threads (so K 288 never qualifies).
- blocks 1 and 2 (not measured on this machine for Convs): a block of 1 feeds one multiply-add per input load, so
  slower per kept MAC: SLOPE scaled by BLOCK_SLOPE_FACTOR, a guess on the safe side.
- FC at batch 1 (bandwidth-bound; see FC_* below).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ctprune.runtime.cpu import for_this_cpu

MARGIN = 1.1  # keep a layer sparse only when expected >= 10% faster: never slower, and the measurements are noisy
MIN_DENSE_MACS = 20_000  # below this a call is fixed overheads on both sides: keep it dense


@dataclass(frozen=True)
class Calibration:
    """(FIXED, SLOPE) per form on one tier of the kernels; the 1x1 FIXED depends on how much work each output has."""

    pointwise_fixed: tuple[tuple[int, int, float], ...]  # (max input channels, min pixels, FIXED): first that fits
    pointwise_slope: dict[int, float]  # per block: block 1 feeds one FMA per input load, much slower per kept MAC
    strided_pointwise: tuple[float, float]  # 1x1 stride > 1, blocks 4 and 8
    general_fixed_work: float  # every other Conv: FIXED = min(general_fixed_max, work / K), K = Cg * kh * kw
    general_fixed_max: float
    general_slope: float
    fc: dict[int, tuple[float, float]]  # per block
    block_slope_factor: dict[int, float] = field(default_factory=lambda: {1: 2.0, 2: 1.4, 4: 1.0, 8: 1.0})
    threads_factor: dict[str, tuple[float, float]] = field(  # 2 threads or more: (FIXED, SLOPE) scaled
        default_factory=lambda: {"conv1x1": (1.6, 1.6), "conv1x1s": (1.6, 1.6), "conv": (1.5, 2.0)})


CALIBRATIONS = {
    # Xeon (Sapphire Rapids) with AVX-512, onnxruntime 1.32: the measurements in the module doc. Checked on an AMD EPYC
    # Zen 5 (AVX-512, 1 thread; bench_layers --sparse --quick --ratios 2 4 8 16 --blocks 4 8 --kinds conv fc, and
    # --kinds general): every 1x1, strided 1x1 and kxk layer measured there was at least as fast as this predicts;
    # FC with blocks of 4 was slower (4096x25088 at 2x: 1.18x, at 8x 3.30x), so its slope is that envelope's.
    "avx512": Calibration(
        pointwise_fixed=((64, 0, 0.6), (1 << 30, 3136, 0.6), (1 << 30, 0, 0.3)),
        pointwise_slope={1: 3.0, 2: 2.0, 4: 1.5, 8: 1.5},
        strided_pointwise=(0.25, 1.0),
        general_fixed_work=300.0, general_fixed_max=0.75, general_slope=1.45,
        fc={1: (0.1, 2.0), 2: (0.1, 1.8), 4: (0.1, 1.65), 8: (0.1, 1.25)},
    ),
    # AMD EPYC Zen 3 with AVX2 + FMA, onnxruntime 1.32, the kernel of commit 5026f93 (tests/data/sparse_cost_avx2.csv:
    # bench_layers --sparse --quick --ratios 4 8 --blocks 4 8 --kinds conv general, the median of three runs; FC from
    # --kinds fc, kernel of bf09c40): 8 floats a vector and 16 registers, so the dense op is relatively stronger than
    # with AVX-512. Upper envelope of the measured time ratios: 1x1 FIXED by input channels (<= 32: 0.41, <= 255:
    # 0.37, more: 0.24), SLOPE 1.4 (blocks 4 and 8: a block of 8 runs as two of 4); 1x1 stride 2 FIXED 0.21, SLOPE
    # 1.0; kxk FIXED min(0.57, 205 / K), SLOPE 2.6.
    "avx2": Calibration(
        pointwise_fixed=((32, 0, 0.41), (255, 0, 0.37), (1 << 30, 0, 0.24)),
        pointwise_slope={1: 2.8, 2: 1.9, 4: 1.4, 8: 1.4},
        strided_pointwise=(0.21, 1.0),
        general_fixed_work=205.0, general_fixed_max=0.57, general_slope=2.6,
        fc={1: (0.15, 2.4), 2: (0.15, 2.0), 4: (0.15, 1.6), 8: (0.15, 1.5)},
    ),
}
CALIBRATIONS["generic"] = CALIBRATIONS["avx2"]  # not measured: the portable tier is no faster than AVX2


def calibration(tier: str | None = None) -> Calibration:
    """The calibration of `tier`, or of what this machine runs (runtime/cpu.for_this_cpu)."""
    return for_this_cpu(CALIBRATIONS, tier)


def layer_form(kind: str, weight_shape: Sequence[int], stride: int | Sequence[int] = 1) -> str:
    """"fc", "conv1x1" (1x1 stride 1: the aligned fast path), "conv1x1s" (1x1 strided: subsampled, then that path) or
    "conv" (every other Conv)."""
    if kind == "fc" or len(weight_shape) == 2:
        return "fc"
    if kind != "conv":
        raise ValueError(f"kind must be 'conv' or 'fc', got {kind!r}")
    strides = (stride, stride) if isinstance(stride, int) else tuple(stride)
    if tuple(weight_shape[2:]) == (1, 1):
        return "conv1x1" if strides == (1, 1) else "conv1x1s"
    return "conv"


def _pointwise_fixed(cal: Calibration, in_channels: int, pixels: int) -> float:
    # Few input channels or a large image: each output has little work next to its write and epilogue.
    return next(fixed for most_channels, least_pixels, fixed in cal.pointwise_fixed
                if in_channels <= most_channels and pixels >= least_pixels)


def _fixed_and_slope(form: str, weight_shape, input_hw, stride, block: int, threads: int = 1,
                     tier: str | None = None) -> tuple[float, float]:
    cal = calibration(tier)
    if block not in (1, 2, 4, 8):
        raise ValueError(f"no calibration for block {block} (blocks are 1, 2, 4, 8)")
    if form == "fc":
        return cal.fc[block]
    if form == "conv1x1":
        h, w = (int(v) for v in input_hw)
        fixed, slope = _pointwise_fixed(cal, int(weight_shape[1]), h * w), cal.pointwise_slope[block]
    elif form == "conv1x1s":
        fixed, slope = cal.strided_pointwise[0], cal.strided_pointwise[1] * cal.block_slope_factor[block]
    else:
        work = math.prod(int(d) for d in weight_shape[1:])  # dense multiply-adds per output
        fixed = min(cal.general_fixed_max, cal.general_fixed_work / max(1, work))
        slope = cal.general_slope * cal.block_slope_factor[block]
    if int(threads) > 1:
        fixed_factor, slope_factor = cal.threads_factor[form]
        fixed, slope = fixed * fixed_factor, slope * slope_factor
    return fixed, slope


def _dense_macs(form, weight_shape, input_hw, stride) -> int:
    weights = math.prod(int(d) for d in weight_shape)
    if form == "fc":
        return weights
    strides = (stride, stride) if isinstance(stride, int) else tuple(stride)
    h, w = (int(v) for v in input_hw)
    return weights * max(1, h // strides[0]) * max(1, w // strides[1])


def estimated_speedup(
    kind: str,
    weight_shape: Sequence[int],
    input_hw: Optional[Sequence[int]],
    stride: int | Sequence[int],
    density: float,
    block: int,
    threads: int = 1,
    tier: str | None = None,
) -> float:
    """Dense time / SparseConv time, estimated (see the module doc); `threads` > 1 uses the 2-thread calibration;
    `tier` defaults to the kernel tier this machine runs."""
    form = layer_form(kind, weight_shape, stride)
    fixed, slope = _fixed_and_slope(form, weight_shape, input_hw, stride, int(block), threads, tier)
    if _dense_macs(form, weight_shape, input_hw, stride) < MIN_DENSE_MACS:
        return 1.0
    return 1.0 / (fixed + slope * min(1.0, max(0.0, float(density))))


def sparse_beats_dense(
    kind: str,
    weight_shape: Sequence[int],
    input_hw: Optional[Sequence[int]],
    stride: int | Sequence[int],
    density: float,
    block: int,
    threads: int = 1,
    tier: str | None = None,
) -> bool:
    """True when SparseConv is expected to be faster than onnxruntime's dense op by the margin."""
    return estimated_speedup(kind, weight_shape, input_hw, stride, density, block, threads, tier) >= MARGIN


def break_even_density(kind: str, weight_shape: Sequence[int], input_hw, stride, block: int, threads: int = 1,
                       tier: str | None = None) -> float:
    """The largest density at which SparseConv still beats dense by the margin (0 when it never does)."""
    form = layer_form(kind, weight_shape, stride)
    if _dense_macs(form, weight_shape, input_hw, stride) < MIN_DENSE_MACS:
        return 0.0
    fixed, slope = _fixed_and_slope(form, weight_shape, input_hw, stride, int(block), threads, tier)
    return max(0.0, min(1.0, (1.0 / MARGIN - fixed) / slope))
