"""Depthwise Convs beside ctprune's ops run as SparseConv nodes holding all their weights.

Why: at its default level onnxruntime runs dense Convs in its NCHWc layout, and where one meets an op that reads or
writes NCHW (every PatternConv and SparseConv) it inserts a ReorderInput or ReorderOutput. In MobileNet-style blocks
(pruned 1x1 -> depthwise -> pruned 1x1) that is two reorders per block, about a fifth of a pruned MobileNetV2's
time. SparseConv runs a depthwise Conv (one input channel per group, no dilation, stride 1 or 2) on its own path
(csrc/cpu/sparse_conv_kernels.inc) faster than onnxruntime's NCHWc kernel with its two reorders, so such a Conv
becomes a SparseConv with every weight kept: the chain stays NCHW and the depthwise layer stays dense (its weights
are not pruned; PreCropping is what shrinks depthwise layers).

On the AVX-512 tier a Conv that onnxruntime would run in NCHWc also needs an output at least MIN_OUTPUT_WIDTH wide,
unless it is 3x3: onnxruntime's depthwise kernel computes 16 channels per vector whatever the plane, while SparseConv's
path runs along a row of one channel, and on 7-wide rows (9 of 16 lanes idle) its general kernel lost even with both
reorders counted; 3x3 rows of at most one vector have a kernel of their own, which wins there.

Only Convs with ctprune ops on both sides move (the input written by one, the result read by one, through
elementwise ops at most): that saves both reorders. With an onnxruntime Conv on one side the count of reorders stays
the same whichever op runs the depthwise Conv, and onnxruntime's own NCHWc depthwise kernel is the faster of the two
at stride 2 and on 7x7-14x14 planes (BENCHMARKS.md, "Depthwise Convs beside pruned layers").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ctprune.graph.layers import conv_attributes
from ctprune.ops.names import DOMAIN
from ctprune.runtime.cpu import for_this_cpu

# What SparseConv's depthwise path takes (the kernel falls back to its general path otherwise, which is slower than
# onnxruntime's depthwise Conv): square kernels up to 7, stride 1 or 2 on both axes, no dilation, multiplier 1.
DEPTHWISE_KERNELS = (3, 5, 7)
DEPTHWISE_STRIDES = (1, 2)
# The narrowest output row worth moving, per kernel tier (missing: any). AMD EPYC Zen 5, AVX-512, 1 thread, the
# MobileNetV2 example at 8x (`--epochs 0`; onnxruntime's profiler): 7x7 outputs of 192-576 channels took SparseConv
# 9-22 us against 5-10 us for onnxruntime's Conv plus 5 us of reorders, 14x14 ones 11 us against 13-16 us; moving
# every depthwise Conv made the model 1.22x faster than dense, moving none 1.41x. On Zen 3's AVX2 every width gained
# (C960 7x7: 108 us against 137 us).
MIN_OUTPUT_WIDTH = {"avx512": 14}
# ... except for this kernel: its output rows of at most one vector have their own kernel (sixteenth session, Zen 4,
# `bench_layers --sparse --kinds depthwise`: against onnxruntime's Conv with its reorders, 7x7 planes 1.18-1.44x
# where the general kernel ran 0.91-0.96x, 14x14 2.36-2.44x where it ran 1.20-1.23x; the MobileNetV2 example at 8x
# 1.93x faster than dense with every depthwise Conv moved, 1.76x with only those 14 wide). 5x5 ones on 7x7 planes
# only draw even (0.97-1.01x), so they keep the width rule.
NARROW_KERNEL = (3, 3)
# Elementwise ops between a depthwise Conv and the op that reads its result (folded BN, activations, a residual Add).
_PASS_THROUGH = {"BatchNormalization", "Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "Mul", "Add", "Div",
                 "LeakyRelu", "PRelu"}
# What the report adds to such a Conv's reason for staying dense.
REASON = "runs as SparseConv keeping every weight (no onnxruntime layout reorders around it)"


@dataclass(frozen=True)
class AllWeightsKept:
    """The layer view `_Rewrite.sparse` reads (kept_mask, block, transposed) for a Conv that keeps every weight."""

    weight_shape: tuple[int, ...]
    block: int = 1
    transposed: bool = False

    def kept_mask(self) -> np.ndarray:
        return np.ones(self.weight_shape, dtype=bool)


def runs_on_depthwise_path(node: onnx.NodeProto, weight_shape, x_shape) -> bool:
    """True for a 2-D Conv that SparseConv's depthwise path computes: weight (C, 1, k, k) with group == C == the
    input's channels, k in DEPTHWISE_KERNELS, equal strides in DEPTHWISE_STRIDES, dilations 1."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or weight_shape is None or len(weight_shape) != 4:
        return False
    attrs = conv_attributes(node, weight_shape)
    out_channels, per_group, kh, kw = (int(d) for d in weight_shape)
    channels = x_shape[1] if x_shape and len(x_shape) == 4 and isinstance(x_shape[1], int) else None
    return (per_group == 1 and attrs.group == out_channels and channels == out_channels and kh == kw
            and kh in DEPTHWISE_KERNELS and len(set(attrs.strides)) == 1 and attrs.strides[0] in DEPTHWISE_STRIDES
            and set(attrs.dilations) == {1})


def pays_to_move(y_shape, weight_overridable: bool, kernel=(3, 3), tier: str | None = None) -> bool:
    """Whether SparseConv's depthwise path beats what onnxruntime would run here. onnxruntime moves a Conv to its
    NCHWc layout only when the weight is a constant; one that is also a graph input (IR < 4 exporters list every
    initializer there) runs a plain NCHW kernel, which SparseConv's path beats at every width (CenterFace at 8x,
    Zen 5: moving its 8x8 Convs too, 2.68x against 2.32x). A 3x3 kernel (`kernel`, (kh, kw)) beats the NCHWc one
    at every width too, with its narrow-row kernel; any other NCHWc one needs an output (`y_shape`, NCHW as shape
    inference gave it) at least MIN_OUTPUT_WIDTH wide for `tier` (default: the one that runs)."""
    least = for_this_cpu(MIN_OUTPUT_WIDTH, tier, default=1)
    if weight_overridable or least <= 1 or tuple(kernel) == NARROW_KERNEL:
        return True
    width = y_shape[3] if y_shape and len(y_shape) == 4 else None
    return isinstance(width, int) and width >= least


def beside_ctprune_ops(graph: onnx.GraphProto, skip: set[int], candidates: list[int]) -> list[int]:
    """The candidates (node indices) whose input is written by a ctprune op and whose result is read by one, each
    through elementwise ops at most. `skip`: indices of nodes already fused away (still in the list, no longer in
    the graph)."""
    producer, readers = {}, {}
    for i, node in enumerate(graph.node):
        if i in skip:
            continue
        for name in node.output:
            producer[name] = i
        for name in node.input:
            if name:
                readers.setdefault(name, []).append(i)

    def ours(i: int) -> bool:
        return graph.node[i].domain == DOMAIN

    def elementwise(i: int) -> bool:
        node = graph.node[i]
        return node.op_type in _PASS_THROUGH and node.domain in ("", "ai.onnx")

    def written_by_ours(name: str, depth: int = 4) -> bool:
        i = producer.get(name)
        if i is None:
            return False
        return ours(i) or (depth > 0 and elementwise(i) and any(written_by_ours(x, depth - 1) for x in graph.node[i].input
                                                                 if x in producer))

    def read_by_ours(name: str, depth: int = 4) -> bool:
        return any(ours(i) or (depth > 0 and elementwise(i) and any(read_by_ours(y, depth - 1) for y in graph.node[i].output))
                   for i in readers.get(name, []))

    return [i for i in candidates if written_by_ours(graph.node[i].input[0]) and read_by_ours(graph.node[i].output[0])]
