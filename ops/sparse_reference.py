"""Reference semantics of `ai.ctprune.SparseConv` (spec: SparseConv.md beside this file).

Two references with one meaning:
- `SparseConv`, an onnxscript function in standard ONNX ops that rebuilds the dense weight from the compact blocks and
  runs Conv (an FC layer runs as a 1x1 Conv on a 1x1 image, so one body serves both forms), then the residual, the
  clip and the gate of the activation. ctprune writes it into every model that holds SparseConv nodes as a
  model-local function (`sparse_conv_function`), so a runtime without ctprune's kernels still runs the model.
- `sparse_conv_numpy`, plain float64 numpy, for tests.

The function is written against opset 13 and valid for any default-domain opset from 13 up (every op it uses means
the same from 13 on); `sparse_conv_function(opset)` re-stamps it with the model's opset, as for PatternConv.

An ONNX function cannot branch on an attribute, so the activation picks its gate with Where: with c the clipped output,
    gate = Where(activation == 1, HardSigmoid(c), Where(activation == 2, Sigmoid(c), 1));   Y = c * gate
so Y is exactly c, c * HardSigmoid(c) or c * Sigmoid(c). (Not a sum of gates times 0/1 flags: an unused gate may be
NaN where Y is not, e.g. HardSigmoid(+-inf) with alpha 0, and NaN times 0 is NaN.)
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import onnx
from onnxscript import FLOAT, INT64, script
from onnxscript import opset13 as op

from ctprune.ops.local_function import ctprune_opset, model_local_function
from ctprune.ops.reference import conv2d_numpy
from ctprune.ops.names import (
    ACTIVATION_HARDSIGMOID_MUL,
    ACTIVATION_NONE,
    ACTIVATION_SIGMOID_MUL,
    SPARSE_MIN_OPSET,
    SPARSE_OP_TYPE,
)


@script(ctprune_opset, default_opset=op)
def SparseConv(
    X: FLOAT,
    W: FLOAT,
    I,
    P,
    B: Optional[FLOAT],
    weight_shape: list[int],
    block: int,
    block_order: list[int],
    strides: list[int] = (1, 1),
    pads: list[int] = (0, 0, 0, 0),
    dilations: list[int] = (1, 1),
    group: int = 1,
    activation_min: float = float("-inf"),
    activation_max: float = float("inf"),
    activation: int = 0,
    activation_alpha: float = 0.16666667,
    activation_beta: float = 0.5,
) -> FLOAT:
    # Geometry as tensors: the 4-D weight shape (an FC's (O, I) read as (O, I, 1, 1)), the column space of a group.
    shape = op.Constant(value_ints=weight_shape)
    one = op.Constant(value_ints=[1])
    zero = op.Constant(value_ints=[0])
    four = op.Slice(op.Concat(shape, op.Constant(value_ints=[1, 1]), axis=0), zero, op.Constant(value_ints=[4]))
    columns = op.ReduceProd(op.Slice(four, one, op.Constant(value_ints=[4])), keepdims=1)  # (1,)
    out_channels = op.Slice(four, zero, one)  # (1,)
    lanes = op.Constant(value_int=block)
    groups = op.Constant(value_int=group)

    # Which stored block each row of W belongs to: P holds the row ranges of the stored blocks, so a CumSum over
    # marks at the first row of every nonempty block (each mark the jump in storage position) counts positions.
    pointer = op.Cast(P, to=INT64.dtype)
    starts = op.Slice(pointer, zero, op.Constant(value_ints=[-1]))
    counts = op.Sub(op.Slice(pointer, one, op.Constant(value_ints=[2147483647])), starts)
    positions = op.Range(op.Constant(value_int=0), op.Squeeze(op.Shape(starts), zero), op.Constant(value_int=1))
    nonempty = op.Greater(counts, op.Constant(value_int=0))
    first_rows = op.Compress(starts, nonempty)
    kept_positions = op.Compress(positions, nonempty)
    previous = op.Slice(op.Concat(zero, kept_positions, axis=0), zero, op.Constant(value_ints=[-1]))
    rows = op.Slice(op.Shape(W), zero, one)
    marks = op.ScatterElements(op.Cast(op.ConstantOfShape(rows), to=INT64.dtype), first_rows,
                               op.Sub(kept_positions, previous))
    block_of_row = op.Gather(op.Constant(value_ints=block_order), op.CumSum(marks, zero), axis=0)  # (K,)

    # Scatter every weight into a (blocks * block, columns) matrix: row = block id * block + lane.
    padded_row = op.Add(op.Mul(op.Unsqueeze(block_of_row, one), lanes),
                        op.Range(op.Constant(value_int=0), lanes, op.Constant(value_int=1)))  # (K, block)
    flat = op.Add(op.Mul(padded_row, columns), op.Unsqueeze(op.Cast(I, to=INT64.dtype), one))
    block_count = op.Shape(op.Constant(value_ints=block_order))
    padded_size = op.Mul(op.Mul(block_count, op.Reshape(lanes, one)), columns)
    padded = op.ScatterND(op.ConstantOfShape(padded_size), op.Reshape(flat, op.Constant(value_ints=[-1, 1])),
                          op.Reshape(W, op.Constant(value_ints=[-1])))
    padded = op.Reshape(padded, op.Concat(op.Constant(value_ints=[-1]), columns, axis=0))
    # Output channel o of group g = o // (O / group) sits at row (g * blocks per group) * block + o % (O / group).
    per_group = op.Div(op.Squeeze(out_channels, zero), groups)
    blocks_per_group = op.Div(op.Sub(op.Add(per_group, lanes), op.Constant(value_int=1)), lanes)
    channel = op.Range(op.Constant(value_int=0), op.Squeeze(out_channels, zero), op.Constant(value_int=1))
    row = op.Add(op.Mul(op.Mul(op.Div(channel, per_group), blocks_per_group), lanes), op.Mod(channel, per_group))
    dense = op.Reshape(op.Gather(padded, row, axis=0), four)

    # Conv on a 4-D view of X ((N, I) -> (N, I, 1, 1) for an FC), then back to X's rank.
    x_shape = op.Shape(X)
    x4 = op.Reshape(X, op.Slice(op.Concat(x_shape, op.Constant(value_ints=[1, 1]), axis=0), zero,
                                op.Constant(value_ints=[4])))
    conv4 = op.Conv(x4, dense, B, strides=strides, pads=pads, dilations=dilations, group=group)
    conv = op.Reshape(conv4, op.Slice(op.Shape(conv4), zero, op.Shape(x_shape)))

    clipped = op.Clip(conv, op.Constant(value_float=activation_min), op.Constant(value_float=activation_max))
    kind = op.Constant(value_int=activation)
    gate = op.Where(op.Equal(kind, op.Constant(value_int=1)),
                    op.HardSigmoid(clipped, alpha=activation_alpha, beta=activation_beta),
                    op.Where(op.Equal(kind, op.Constant(value_int=2)), op.Sigmoid(clipped),
                             op.Constant(value_float=1.0)))
    Y = op.Mul(clipped, gate)
    return Y


def sparse_conv_function(opset: int = SPARSE_MIN_OPSET, residual: bool = False) -> onnx.FunctionProto:
    """The model-local FunctionProto for ai.ctprune.SparseConv, importing default-domain `opset` (>= 13) like its model.

    residual: the form with the sixth input Z, added before the clip. As for PatternConv, a model carries one form:
    where any SparseConv node has a residual, every SparseConv node of the model must pass a Z (a one-element zero
    when it has none)."""
    return model_local_function(SparseConv, SPARSE_OP_TYPE, SPARSE_MIN_OPSET, opset, residual)


def blocks_of(weight_shape: Sequence[int], block: int, group: int = 1) -> list[tuple[int, int, int]]:
    """(group, first output channel, channels) of every block, in block-id order (SparseConv.md, "Blocks")."""
    O = int(weight_shape[0])
    per_group = O // group
    out = []
    for g in range(group):
        for first in range(0, per_group, block):
            out.append((g, g * per_group + first, min(block, per_group - first)))
    return out


def dense_weight_from_sparse(
    W: np.ndarray, I: np.ndarray, P: np.ndarray, weight_shape: Sequence[int], block: int, block_order: Sequence[int],
    group: int = 1,
) -> np.ndarray:
    """The dense weight (weight_shape, W's dtype) a SparseConv node stands for."""
    W = np.asarray(W)
    O = int(weight_shape[0])
    dense = np.zeros((O, int(np.prod(weight_shape[1:]))), dtype=W.dtype)
    blocks = blocks_of(weight_shape, block, group)
    P = np.asarray(P, dtype=np.int64)
    I = np.asarray(I, dtype=np.int64)
    for position, block_id in enumerate(block_order):
        _, first, size = blocks[int(block_id)]
        rows = slice(P[position], P[position + 1])
        dense[first : first + size, I[rows]] = W[rows, :size].T
    return dense.reshape(tuple(int(d) for d in weight_shape))


def hard_sigmoid(x: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    return np.maximum(0.0, np.minimum(1.0, alpha * x + beta))


def apply_activation(c: np.ndarray, activation: int, alpha: float = 1 / 6, beta: float = 0.5) -> np.ndarray:
    """The gate of the `activation` attribute applied to the clipped output c."""
    if activation == ACTIVATION_NONE:
        return c
    if activation == ACTIVATION_HARDSIGMOID_MUL:
        return c * hard_sigmoid(c, alpha, beta)
    if activation == ACTIVATION_SIGMOID_MUL:
        with np.errstate(over="ignore"):
            return c / (1.0 + np.exp(-c))
    raise ValueError(f"unknown activation {activation}")


def sparse_conv_numpy(
    X: np.ndarray,
    dense: np.ndarray,
    B: Optional[np.ndarray] = None,
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
    group: int = 1,
    activation_min: float = float("-inf"),
    activation_max: float = float("inf"),
    activation: int = ACTIVATION_NONE,
    activation_alpha: float = 1 / 6,
    activation_beta: float = 0.5,
    Z: Optional[np.ndarray] = None,
) -> np.ndarray:
    """SparseConv in float64 numpy from the dense weight (see dense_weight_from_sparse): Conv or FC, + Z, clip, gate."""
    X = np.asarray(X, dtype=np.float64)
    dense = np.asarray(dense, dtype=np.float64)
    if dense.ndim == 2:
        Y = X @ dense.T
        if B is not None:
            Y = Y + np.asarray(B, dtype=np.float64)
    else:
        Y = conv2d_numpy(X, dense, B, strides, pads, dilations, group)
    if Z is not None:
        Y = Y + np.asarray(Z, dtype=np.float64)
    return apply_activation(np.clip(Y, activation_min, activation_max), activation, activation_alpha, activation_beta)
