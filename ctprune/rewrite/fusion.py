"""Graph queries and fusion rules shared by the PatternConv and SparseConv rewrites.

Each `fusable_*` rule looks at what reads a layer's output and says whether (and how) the next node folds into the
pruned op: an inference BatchNormalization with constant parameters (folded into the weights), a residual Add of a
same-shaped tensor (the op's Z input), an activation (Relu, constant Clip, HardSwish, x * HardSigmoid(x),
x * Sigmoid(x)). A rule fuses only where the layer's output has exactly one reader (or, for x * gate(x), the two
nodes of the gate), so the graph outside is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ctprune.graph.normalize import infer_shapes
from ctprune.graph.readers import TensorReaders
from ctprune.rewrite.upgrade import detached

RESIDUAL_OPS = ("Add", "Sum")  # Sum of two inputs is an Add (older exporters, e.g. Caffe2's ResNet-50)


def read_counts(graph: onnx.GraphProto) -> TensorReaders:
    """How many times each tensor name is read (node inputs, nested graphs, graph outputs), and by which nodes."""
    return TensorReaders(graph)


def constant_value(graph: onnx.GraphProto, name: str, initializers: dict) -> np.ndarray | None:
    """The value of tensor `name` when it is an initializer or a Constant node's `value`; None otherwise."""
    if name in initializers:
        return numpy_helper.to_array(initializers[name])
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
                if attr.name == "value_float":
                    return np.array(attr.f, dtype=np.float32)
            return None
    return None


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


def fusable_activation(graph, conv_output, reads, initializers, gates: bool = False) -> FusedActivation | None:
    """The activation reading conv_output that can fold into the op before it, else None. Relu and constant Clip
    always; with `gates` (SparseConv) also HardSwish and the two-node x * HardSigmoid(x) and x * Sigmoid(x)."""
    index = only_reader(graph, conv_output, reads)  # None: also read by a graph output, a nested graph, or twice
    if index is None:
        return _fusable_gate(graph, conv_output, reads) if gates else None
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
                value = constant_value(graph, name, initializers)
                if value is None or value.size != 1:
                    return None
                bounds[slot] = float(value.reshape(()))
        for attr in node.attribute:  # Clip before opset 11 (not reached after the upgrade, kept for safety)
            if attr.name in ("min", "max"):
                bounds[attr.name == "max"] = float(attr.f)
        return FusedActivation((index,), node.output[0], lo=bounds[0], hi=bounds[1])
    return None


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


def only_reader(graph, name, reads) -> int | None:
    """Index of the one node that reads `name`, if nothing else (graph output, nested graph, a second slot) does;
    `reads` is the graph's TensorReaders index (a lookup, not a scan of every node)."""
    return reads.only_reader(name)


def fusable_batchnorm(graph, conv_output, reads, initializers) -> tuple[int, np.ndarray, np.ndarray] | None:
    """(node index, scale, shift) of an inference-mode BatchNormalization with constant parameters that is the only
    reader of conv_output (y = x * scale + shift per channel), else None."""
    index = only_reader(graph, conv_output, reads)
    if index is None:
        return None
    node = graph.node[index]
    if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx") or len(node.input) != 5:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if int(attrs.get("training_mode", 0)) != 0 or sum(1 for name in node.output if name) != 1:
        return None
    values = [constant_value(graph, name, initializers) for name in node.input[1:]]
    if any(v is None for v in values):
        return None
    gamma, beta, mean, var = (np.asarray(v, dtype=np.float64).reshape(-1) for v in values)
    scale = gamma / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
    return index, scale, beta - mean * scale


def fusable_residual(graph, conv_output, reads, shapes: Mapping[str, tuple]) -> tuple[int, str] | None:
    """(node index, residual name) of an Add (or two-input Sum) that is the only reader of conv_output and adds a
    tensor of the same static shape (no broadcasting), else None."""
    index = only_reader(graph, conv_output, reads)
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


def shapes_of(model: onnx.ModelProto) -> dict[str, tuple]:
    """Tensor name -> inferred dims (int, or the dim_param string; None where unknown), without touching `model`."""
    probe, _ = detached(model)
    infer_shapes(probe)
    shapes = {}
    for vi in list(probe.graph.input) + list(probe.graph.value_info) + list(probe.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
    for tensor in model.graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
    return shapes


def unique_name(wanted: str, taken: set) -> str:
    name, n = wanted, 1
    while name in taken:
        name, n = f"{wanted}_{n}", n + 1
    taken.add(name)
    return name


def drop_unread(graph: onnx.GraphProto, names: set) -> None:
    """Remove initializers / Constant nodes (and IR-3 graph inputs, value_info) for names nothing reads any more."""
    reads = read_counts(graph)
    gone = {name for name in names if reads[name] == 0}
    if not gone:
        return
    for i in reversed([i for i, t in enumerate(graph.initializer) if t.name in gone]):
        del graph.initializer[i]  # by index: rebuilding the list would copy every weight
    for field in (graph.input, graph.value_info):
        keep = [v for v in field if v.name not in gone]
        del field[:]
        field.extend(keep)
    keep = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] in gone)]
    del graph.node[:]
    graph.node.extend(keep)


def forget_value_info(graph: onnx.GraphProto, names) -> None:
    """Drop the value_info of tensors (a name or a set of names) that fusions made internal: one pass for all."""
    names = {names} if isinstance(names, str) else set(names)
    if not names:
        return
    keep = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(keep)
