"""Would a SparseConv beat onnxruntime's dense op on this layer? A cost model calibrated on this project's CPU.

    sparse_beats_dense(kind, weight_shape, input_hw, stride, density, block, threads=1) -> bool
    estimated_speedup(...)                                                              -> float (dense time / sparse time)

kind: "conv" (weight (O, Cg, kh, kw), input_hw = (H, W) of the input) or "fc" (weight (O, I), input_hw ignored).
density: kept weights / dense weights of the layer. The rewriter keeps a layer dense (holding its zeros) when this
says False.

The model: the sparse kernel runs at a fraction E (its "efficiency") of the dense op's throughput on the work it keeps,
so speedup = E / density, less a fixed per-call cost that matters only on tiny layers. E depends on the form (1x1
stride 1, other Convs, FC), the block size and how much work a layer has per output pixel; the constants below are
fitted on `python -m ctprune.lab.bench_layers --sparse` (BENCHMARKS.md, SparseConv section: the table they come from).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

# Efficiency E (sparse useful throughput / dense throughput), by form and block: fitted medians (see module doc).
EFFICIENCY = {
    ("conv1x1", 1): 0.30,
    ("conv1x1", 2): 0.45,
    ("conv1x1", 4): 0.55,
    ("conv1x1", 8): 0.55,
    ("conv", 1): 0.20,
    ("conv", 2): 0.28,
    ("conv", 4): 0.35,
    ("conv", 8): 0.35,
    ("fc", 1): 0.45,
    ("fc", 2): 0.55,
    ("fc", 4): 0.65,
    ("fc", 8): 0.70,
}
# Below this many dense multiply-adds a call is dominated by fixed costs on both sides: assume no gain.
MIN_DENSE_MACS = 20_000
# Require a margin: the rewriter must never make a layer slower, and the measurements are noisy.
MARGIN = 1.1


def layer_form(kind: str, weight_shape: Sequence[int], stride: int | Sequence[int] = 1) -> str:
    """"fc", "conv1x1" (1x1 stride 1: the aligned fast path) or "conv" (every other Conv)."""
    if kind == "fc" or len(weight_shape) == 2:
        return "fc"
    if kind != "conv":
        raise ValueError(f"kind must be 'conv' or 'fc', got {kind!r}")
    strides = (stride, stride) if isinstance(stride, int) else tuple(stride)
    if tuple(weight_shape[2:]) == (1, 1) and strides == (1, 1):
        return "conv1x1"
    return "conv"


def estimated_speedup(
    kind: str,
    weight_shape: Sequence[int],
    input_hw: Optional[Sequence[int]],
    stride: int | Sequence[int],
    density: float,
    block: int,
    threads: int = 1,
) -> float:
    """Dense time / SparseConv time, estimated (see the module doc)."""
    form = layer_form(kind, weight_shape, stride)
    efficiency = EFFICIENCY.get((form, int(block)))
    if efficiency is None:
        raise ValueError(f"no calibration for block {block} (blocks are 1, 2, 4, 8)")
    if density <= 0:
        return math.inf
    weights = math.prod(int(d) for d in weight_shape)
    if form == "fc":
        macs = weights
    else:
        strides = (stride, stride) if isinstance(stride, int) else tuple(stride)
        h, w = (int(v) for v in input_hw)
        macs = weights * max(1, h // strides[0]) * max(1, w // strides[1])
    if macs < MIN_DENSE_MACS:
        return 1.0
    return efficiency / min(1.0, float(density))


def sparse_beats_dense(
    kind: str,
    weight_shape: Sequence[int],
    input_hw: Optional[Sequence[int]],
    stride: int | Sequence[int],
    density: float,
    block: int,
    threads: int = 1,
) -> bool:
    """True when SparseConv is expected to be faster than onnxruntime's dense op by a safe margin."""
    return estimated_speedup(kind, weight_shape, input_hw, stride, density, block, threads) >= MARGIN


def break_even_density(kind: str, weight_shape: Sequence[int], input_hw, stride, block: int, threads: int = 1) -> float:
    """The largest density at which SparseConv still beats dense by the margin (0 when it never does)."""
    form = layer_form(kind, weight_shape, stride)
    return EFFICIENCY[(form, int(block))] / MARGIN
