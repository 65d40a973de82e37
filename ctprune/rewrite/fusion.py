"""Fusion rules shared by the PatternConv and SparseConv rewrites.

Each `fusable_*` rule looks at what reads a layer's output and says whether (and how) the next node folds into the
pruned op: an inference BatchNormalization with constant parameters, or a Mul and / or Add of per-channel constants
(folded into the weights and bias), a residual Add of a same-shaped tensor (the op's Z input), an activation (Relu,
constant Clip, HardSwish, x * HardSigmoid(x), x * Sigmoid(x), and HardSwish written out as x * Clip(x + a, 0, d) / d,
as paddle2onnx exports it). A rule fuses only where the layer's output has exactly one reader (or, for x * gate(x),
the nodes of the gate), so the graph outside is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from onnx import helper

from ctprune.graph.constants import ConstantTable
from ctprune.graph.readers import TensorReaders

RESIDUAL_OPS = ("Add", "Sum")  # Sum of two inputs is an Add (older exporters, e.g. Caffe2's ResNet-50)


@dataclass(frozen=True)
class FusedActivation:
    """An activation that folds into the op before it: the node indices it replaces and the name it writes.
    kind "clip": y = clip(c, lo, hi) (Relu, Clip); "hardsigmoid_mul": y = c * HardSigmoid(c; alpha, beta) (HardSwish);
    "sigmoid_mul": y = c * Sigmoid(c) (SiLU / Swish)."""

    nodes: tuple[int, ...]
    output: str
    kind: str = "clip"
    lo: float = float("-inf")
    hi: float = float("inf")
    alpha: float = 1.0 / 6.0
    beta: float = 0.5


def fusable_activation(graph, conv_output, reads: TensorReaders, constants: ConstantTable,
                       gates: bool = False) -> FusedActivation | None:
    """The activation reading conv_output that can fold into the op before it, else None. Relu and constant Clip
    always; with `gates` (SparseConv) also HardSwish, the two-node x * HardSigmoid(x) and x * Sigmoid(x), and the
    four-node x * Clip(x + a, 0, d) / d."""
    index = reads.only_reader(conv_output)  # None: also read by a graph output, a nested graph, or twice
    if index is None:
        if not gates:
            return None
        return _fusable_gate(graph, conv_output, reads) or _written_out_hardswish(graph, conv_output, reads, constants)
    node = graph.node[index]
    if node.domain not in ("", "ai.onnx") or node.input[0] != conv_output:
        return None
    if node.op_type == "Relu":
        return FusedActivation((index,), node.output[0], lo=0.0)
    if gates and node.op_type == "HardSwish":
        return FusedActivation((index,), node.output[0], kind="hardsigmoid_mul")
    if node.op_type == "Clip":
        bounds = [float("-inf"), float("inf")]
        for slot, name in enumerate(node.input[1:3]):
            if name:
                bounds[slot] = _scalar_constant(constants, name)
                if bounds[slot] is None:
                    return None
        for attr in node.attribute:  # Clip before opset 11 (not reached after the upgrade, kept for safety)
            if attr.name in ("min", "max"):
                bounds[attr.name == "max"] = float(attr.f)
        return FusedActivation((index,), node.output[0], lo=bounds[0], hi=bounds[1])
    return None


def _scalar_constant(constants: ConstantTable, name: str) -> float | None:
    """A one-element constant as a float, else None."""
    value = constants.value(name) if name else None
    return float(value.reshape(())) if value is not None and value.size == 1 else None


def _fusable_gate(graph, conv_output, reads) -> FusedActivation | None:
    """y = c * gate(c): c read by exactly a HardSigmoid/Sigmoid and the Mul that also reads the gate's output."""
    if reads[conv_output] != 2:
        return None
    readers = reads.nodes(conv_output)
    if len(readers) != 2:
        return None
    kinds = {graph.node[i].op_type: i for i in readers}
    gate_op = "Sigmoid" if "Sigmoid" in kinds else "HardSigmoid" if "HardSigmoid" in kinds else None
    if gate_op is None or "Mul" not in kinds:
        return None
    gate, mul = graph.node[kinds[gate_op]], graph.node[kinds["Mul"]]
    if gate.domain not in ("", "ai.onnx") or mul.domain not in ("", "ai.onnx") or reads[gate.output[0]] != 1:
        return None
    if sorted(mul.input) != sorted([conv_output, gate.output[0]]):
        return None
    nodes = (kinds[gate_op], kinds["Mul"])
    if gate_op == "Sigmoid":
        return FusedActivation(nodes, mul.output[0], kind="sigmoid_mul")
    attrs = {a.name: helper.get_attribute_value(a) for a in gate.attribute}
    return FusedActivation(nodes, mul.output[0], kind="hardsigmoid_mul", alpha=float(attrs.get("alpha", 0.2)),
                           beta=float(attrs.get("beta", 0.5)))


def _sole_reader(graph, reads: TensorReaders, name: str, op_type: str):
    """(index, node) of the default-domain `op_type` node that is the only reader of `name`, else (None, None)."""
    index = reads.only_reader(name)
    node = graph.node[index] if index is not None else None
    ok = node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")
    return (index, node) if ok else (None, None)


def _written_out_hardswish(graph, conv_output, reads, constants: ConstantTable) -> FusedActivation | None:
    """y = c * Clip(c + a, 0, d) / d, which is c * HardSigmoid(c; 1/d, a/d): c read by exactly an Add of a constant a
    and the Mul, the Add read only by a Clip to constant [0, d], the Clip only by the Mul, the Mul only by a Div by
    the same constant d > 0."""
    def scalar(name):
        return _scalar_constant(constants, name)

    readers = reads.nodes(conv_output)
    if reads[conv_output] != 2 or len(readers) != 2:
        return None
    kinds = {graph.node[i].op_type: i for i in readers}
    if set(kinds) != {"Add", "Mul"}:
        return None
    add, mul = graph.node[kinds["Add"]], graph.node[kinds["Mul"]]
    if add.domain not in ("", "ai.onnx") or len(add.input) != 2 or conv_output not in add.input:
        return None
    shift = scalar(add.input[1] if add.input[0] == conv_output else add.input[0])
    clip_index, clip = _sole_reader(graph, reads, add.output[0], "Clip")
    if shift is None or clip is None or clip.input[0] != add.output[0] or len(clip.input) != 3:
        return None
    lo, hi = scalar(clip.input[1]), scalar(clip.input[2])
    if lo != 0.0 or hi is None or not hi > 0.0:
        return None
    if mul.domain not in ("", "ai.onnx") or sorted(mul.input) != sorted([conv_output, clip.output[0]]):
        return None
    if reads.only_reader(clip.output[0]) != kinds["Mul"]:
        return None
    div_index, div = _sole_reader(graph, reads, mul.output[0], "Div")
    if div is None or div.input[0] != mul.output[0] or scalar(div.input[1]) != hi:
        return None
    return FusedActivation((kinds["Add"], clip_index, kinds["Mul"], div_index), div.output[0], kind="hardsigmoid_mul",
                           alpha=1.0 / hi, beta=shift / hi)


@dataclass(frozen=True)
class FoldedAffine:
    """y = x * scale + shift per output channel (scale and shift of one element, or one per channel), written by
    nodes that fold into the Conv before them: the node indices it replaces and the name it writes."""

    nodes: tuple[int, ...]
    output: str
    scale: np.ndarray
    shift: np.ndarray


def fusable_affine(graph, conv_output, reads: TensorReaders, constants: ConstantTable) -> FoldedAffine | None:
    """What folds into a Conv's weight and bias after it, each node the only reader of the one before: an
    inference-mode BatchNormalization with constant parameters, or a Mul by a constant and / or an Add of a
    constant, each of one element or one per channel ((C, 1, 1) or (1, C, 1, 1): the learnable affine of
    PP-LCNetV3-style nets). None when nothing does."""
    return _batchnorm(graph, conv_output, reads, constants) or _scale_shift(graph, conv_output, reads, constants)


def _batchnorm(graph, conv_output, reads, constants) -> FoldedAffine | None:
    index, node = _sole_reader(graph, reads, conv_output, "BatchNormalization")
    if node is None or len(node.input) != 5:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if int(attrs.get("training_mode", 0)) != 0 or sum(1 for name in node.output if name) != 1:
        return None
    values = [constants.value(name) for name in node.input[1:]]
    if any(v is None for v in values):
        return None
    gamma, beta, mean, var = (np.asarray(v, dtype=np.float64).reshape(-1) for v in values)
    scale = gamma / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
    return FoldedAffine((index,), node.output[0], scale, beta - mean * scale)


def _channel_constant(constants: ConstantTable, name: str) -> np.ndarray | None:
    """A constant that broadcasts over an NCHW tensor along the channels only, as a flat float64 array."""
    value = constants.value(name) if name else None
    if value is None or not np.issubdtype(np.asarray(value).dtype, np.floating):
        return None
    value = np.asarray(value, dtype=np.float64)
    per_channel = (value.ndim == 3 and value.shape[1:] == (1, 1)) or (value.ndim == 4 and value.shape[0] == 1
                                                                       and value.shape[2:] == (1, 1))
    return value.reshape(-1) if value.size == 1 or per_channel else None


def _scale_shift(graph, conv_output, reads, constants) -> FoldedAffine | None:
    nodes, output = [], conv_output
    scale, shift = np.ones(1), np.zeros(1)
    for op_type in ("Mul", "Add"):
        index, node = _sole_reader(graph, reads, output, op_type)
        if node is None or len(node.input) != 2:
            continue
        other = node.input[1] if node.input[0] == output else node.input[0]
        value = _channel_constant(constants, other) if other != output else None
        if value is None:
            continue
        if op_type == "Mul":
            scale = value
        else:
            shift = value
        nodes.append(index)
        output = node.output[0]
    return FoldedAffine(tuple(nodes), output, scale, shift) if nodes else None


def fusable_residual(graph, conv_output, reads: TensorReaders, shapes: Mapping[str, tuple]) -> tuple[int, str] | None:
    """(node index, residual name) of an Add (or two-input Sum) that is the only reader of conv_output and adds a
    tensor of the same static shape (no broadcasting), else None."""
    index = reads.only_reader(conv_output)
    if index is None:
        return None
    node = graph.node[index]
    if node.op_type not in RESIDUAL_OPS or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    residual = node.input[1] if node.input[0] == conv_output else node.input[0]
    if not residual or residual == conv_output:
        return None
    ours, theirs = shapes.get(conv_output), shapes.get(residual)
    if ours is None or ours != theirs or any(d is None for d in ours):
        return None
    return index, residual
