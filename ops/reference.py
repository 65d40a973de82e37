"""Reference semantics of `ai.ctprune.PatternConv` (spec: PatternConv.md beside this file).

Two references with one meaning:
- `PatternConv`, an onnxscript function in standard ONNX ops. ctprune writes it into every model it rewrites as a
  model-local function (`pattern_conv_function`, with the residual input Z where the model fuses residual Adds), so a
  runtime without ctprune's kernels still runs the model;
  onnxruntime prefers a registered kernel of the same domain and name when ctprune's library is loaded.
- `pattern_conv_numpy`, a plain float64 numpy implementation, for tests.

The function is written once against opset 13 and is valid for any default-domain opset from 13 up: every op it uses
(Constant value_ints/value_int/value_float, Reshape, Shape, Gather, Max, Mul, Div, Mod, Add, Slice, Expand,
CumSum, ConstantOfShape, ScatterElements and ScatterND without reduction, Conv, Clip with min/max inputs) means the
same from opset 13 on. A model-local function must import the same default-domain opset as its model, so
`pattern_conv_function(opset)` re-stamps it. Models below opset 13 are upgraded by the rewriter
(ctprune.rewrite.rewrite_model) with onnx.version_converter before any node is rewritten.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import onnx
from onnxscript import FLOAT, script
from onnxscript import opset13 as op

from ctprune.ops.local_function import ctprune_opset, model_local_function
from ctprune.ops.names import MIN_OPSET, OP_TYPE


@script(ctprune_opset, default_opset=op)
def PatternConv(
    X: FLOAT,
    W: FLOAT,
    B: Optional[FLOAT],
    weight_shape: list[int],
    patterns: list[int],
    filter_runs: list[int],
    kernel_codes: list[int],
    strides: list[int] = (1, 1),
    pads: list[int] = (0, 0, 0, 0),
    dilations: list[int] = (1, 1),
    group: int = 1,
    activation_min: float = float("-inf"),
    activation_max: float = float("inf"),
) -> FLOAT:
    # The kept kernels' lists (pattern_layout.py): kernel_codes = input channel * P + pattern id; filter_runs =
    # (filter, kernel count) pairs in storage order, expanded to one filter per kernel by marking where each run
    # after the first starts and counting the marks.
    library = op.Reshape(op.Constant(value_ints=patterns), op.Constant(value_ints=[-1, 4]))
    # P, at least 1: a layer with no kernel left may carry an empty library (and no codes to divide)
    library_rows = op.Gather(op.Shape(library), op.Constant(value_ints=[0]), axis=0)
    num_patterns = op.Max(library_rows, op.Constant(value_ints=[1]))
    codes = op.Constant(value_ints=kernel_codes)
    kernel_patterns = op.Mod(codes, num_patterns)
    kernel_channels = op.Div(codes, num_patterns)
    runs = op.Reshape(op.Constant(value_ints=filter_runs), op.Constant(value_ints=[-1, 2]))
    run_filters = op.Gather(runs, op.Constant(value_int=0), axis=1)
    run_ends = op.CumSum(op.Gather(runs, op.Constant(value_int=1), axis=1), op.Constant(value_int=0))
    later_starts = op.Slice(run_ends, op.Constant(value_ints=[0]), op.Constant(value_ints=[-1]))
    marks = op.ScatterElements(
        op.Mul(codes, op.Constant(value_ints=[0])),  # int64 zeros, one per kernel
        later_starts, op.Expand(op.Constant(value_ints=[1]), op.Shape(later_starts)), axis=0)
    kernel_filters = op.Gather(run_filters, op.CumSum(marks, op.Constant(value_int=0)), axis=0)
    # Rebuild the dense (O, C, 3, 3) weight: kept kernel k puts its 4 weights at the flat positions
    # (filter * C + channel) * 9 + tap, one per tap of its pattern; everything else stays 0.
    shape = op.Constant(value_ints=weight_shape)
    taps = op.Gather(library, kernel_patterns, axis=0)
    channels = op.Gather(shape, op.Constant(value_ints=[1]), axis=0)
    kernel_index = op.Add(op.Mul(kernel_filters, channels), kernel_channels)
    first_tap = op.Mul(op.Reshape(kernel_index, op.Constant(value_ints=[-1, 1])), op.Constant(value_ints=[9]))
    flat_index = op.Reshape(op.Add(first_tap, taps), op.Constant(value_ints=[-1, 1]))
    zeros = op.Reshape(op.ConstantOfShape(shape), op.Constant(value_ints=[-1]))
    dense = op.Reshape(op.ScatterND(zeros, flat_index, op.Reshape(W, op.Constant(value_ints=[-1]))), shape)
    conv = op.Conv(X, dense, B, strides=strides, pads=pads, dilations=dilations, group=group)
    Y = op.Clip(conv, op.Constant(value_float=activation_min), op.Constant(value_float=activation_max))
    return Y


def pattern_conv_function(opset: int = MIN_OPSET, residual: bool = False) -> onnx.FunctionProto:
    """The model-local FunctionProto for ai.ctprune.PatternConv, importing default-domain `opset` (>= 13) like its model.

    residual: the form with the fourth input Z, added before the activation. A model has one function per op, and a
    function cannot test whether an optional input was given (onnxruntime crashes on an Add of a missing input), so
    a model with any fused residual uses this form for all its PatternConv nodes, the others passing a one-element
    zero as Z."""
    return model_local_function(PatternConv, OP_TYPE, MIN_OPSET, opset, residual)


def dense_weight_from_compact(
    W: np.ndarray,
    weight_shape: Sequence[int],
    patterns: Sequence[int],
    kernel_filters: Sequence[int],
    kernel_channels: Sequence[int],
    kernel_patterns: Sequence[int],
) -> np.ndarray:
    """The dense (O, C, 3, 3) weight a PatternConv node stands for (W's dtype kept)."""
    W = np.asarray(W)
    library = np.asarray(patterns, dtype=np.int64).reshape(-1, 4)
    dense = np.zeros(int(np.prod(weight_shape)), dtype=W.dtype).reshape(weight_shape[0], weight_shape[1], 9)
    taps = library[np.asarray(kernel_patterns, dtype=np.int64)]  # (K, 4)
    filters = np.asarray(kernel_filters, dtype=np.int64)[:, None]
    channels = np.asarray(kernel_channels, dtype=np.int64)[:, None]
    dense[filters, channels, taps] = W.reshape(-1, 4)
    return dense.reshape(tuple(weight_shape))


def conv2d_numpy(
    X: np.ndarray,
    weight: np.ndarray,
    B: Optional[np.ndarray] = None,
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
    group: int = 1,
) -> np.ndarray:
    """Plain 2-D convolution in float64: the textbook sum over taps, group by group."""
    X = np.asarray(X, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    N, C, H, Wd = X.shape
    O, Cg, KH, KW = weight.shape
    top, left, bottom, right = pads
    sh, sw = strides
    dh, dw = dilations
    padded = np.zeros((N, C, H + top + bottom, Wd + left + right))
    padded[:, :, top : top + H, left : left + Wd] = X
    OH = (H + top + bottom - dh * (KH - 1) - 1) // sh + 1
    OW = (Wd + left + right - dw * (KW - 1) - 1) // sw + 1
    Y = np.zeros((N, O, OH, OW))
    per_group = O // group
    for g in range(group):
        xs = padded[:, g * Cg : (g + 1) * Cg]
        ws = weight[g * per_group : (g + 1) * per_group]
        for ky in range(KH):
            for kx in range(KW):
                y0, x0 = ky * dh, kx * dw
                window = xs[:, :, y0 : y0 + sh * (OH - 1) + 1 : sh, x0 : x0 + sw * (OW - 1) + 1 : sw]
                Y[:, g * per_group : (g + 1) * per_group] += np.einsum("nchw,oc->nohw", window, ws[:, :, ky, kx])
    if B is not None:
        Y += np.asarray(B, dtype=np.float64)[None, :, None, None]
    return Y


def pattern_conv_numpy(
    X: np.ndarray,
    W: np.ndarray,
    B: Optional[np.ndarray],
    weight_shape: Sequence[int],
    patterns: Sequence[int],
    kernel_filters: Sequence[int],
    kernel_channels: Sequence[int],
    kernel_patterns: Sequence[int],
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    activation_min: float = float("-inf"),
    activation_max: float = float("inf"),
    Z: Optional[np.ndarray] = None,
) -> np.ndarray:
    """PatternConv in float64 numpy, straight from the spec: rebuild the dense weight, convolve, add Z, clip."""
    dense = dense_weight_from_compact(W, weight_shape, patterns, kernel_filters, kernel_channels, kernel_patterns)
    Y = conv2d_numpy(X, dense, B, strides, pads)
    if Z is not None:
        Y = Y + np.asarray(Z, dtype=np.float64)
    return np.clip(Y, activation_min, activation_max)
