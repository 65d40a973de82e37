"""Prepare a model for lifting: one pass per idea, each a small function over a copy of the proto.

1. IR < 4 models list initializers as graph inputs too: those are dropped from the inputs (they are weights, not data).
2. An ``input_shape`` given by the user replaces the declared input shape (``None`` keeps a dim dynamic).
3. Constant nodes become initializers under their output name, so a weight is one name however it was stored.
4. Shape inference (graph/shapes.py).
5. Constant folding: every node whose inputs are all constants (and Shape of a statically shaped tensor) is evaluated
   with the interpreter's own torch ops and replaced by an initializer named after its output. Weight names survive:
   a pass-through (Transpose, Reshape, ...) from a stored weight into a Conv/Gemm/MatMul/BN weight slot is NOT folded,
   so the stored tensor stays the trainable one. A dynamic batch dim stays dynamic (Shape of it is not folded).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import onnx
import onnx.numpy_helper
import torch

from ctprune.graph.load import default_opset
from ctprune.graph.ops import OPS, OpNode, op_key
from ctprune.graph.ops.tensor import constant_value
from ctprune.graph.shapes import infer_shapes, shape_table
from ctprune.graph.weightless import FLOAT_TYPES, stored_array

__all__ = ["normalize", "WEIGHT_SLOTS", "PASS_THROUGH", "FLOAT_TYPES"]

log = logging.getLogger(__name__)

# op type -> input indices that hold trainable weights (Gemm/MatMul: whichever side is a stored float tensor).
WEIGHT_SLOTS = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "BatchNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "PRelu": (1,),
}
BN_STAT_SLOTS = {"BatchNormalization": (3, 4)}
PASS_THROUGH = {"Identity", "Transpose", "Reshape", "Unsqueeze", "Squeeze", "Cast", "Flatten"}


def normalize(model: onnx.ModelProto, input_shape=None, weights=None) -> onnx.ModelProto:
    """A lifting-ready copy of ``model`` (the argument is not modified). ``weights``: {name: TensorProto} for the
    initializers of ``model`` that are placeholders (a detached copy, weightless.py); constant folding reads them."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    drop_initializer_inputs(out)
    if input_shape is not None:
        set_input_shapes(out, input_shape)
    _constants_to_initializers(out)
    out = infer_shapes(out)
    folded = _fold_constants(out, weights)
    if folded:
        log.debug("folded %d constant nodes", folded)
        out = infer_shapes(out)
    return out


def drop_initializer_inputs(model):
    names = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in names]
    if len(keep) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(keep)


def set_input_shapes(model, input_shape):
    if isinstance(input_shape, dict):
        shapes = input_shape
    else:
        shapes = {model.graph.input[0].name: input_shape}
    for vi in model.graph.input:
        if vi.name not in shapes:
            continue
        dims = vi.type.tensor_type.shape
        del dims.dim[:]
        for d in shapes[vi.name]:
            dim = dims.dim.add()
            if d is None or (isinstance(d, int) and d < 0):
                dim.dim_param = "batch" if len(dims.dim) == 1 else f"d{len(dims.dim) - 1}"
            elif isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = int(d)
    # Stale inferred shapes would contradict the new input shape.
    del model.graph.value_info[:]


def _constants_to_initializers(model):
    keep = []
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0]:
            attrs = OpNode.from_proto(node, 0).attrs
            if "sparse_value" not in attrs and "value_string" not in attrs and "value_strings" not in attrs:
                model.graph.initializer.append(onnx.numpy_helper.from_array(constant_value(attrs), node.output[0]))
                continue
        keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _weight_feeders(model) -> set[str]:
    """Names that reach a weight slot, directly or through pass-through ops."""
    reach = set()
    for node in model.graph.node:
        for i in WEIGHT_SLOTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i]:
                reach.add(node.input[i])
    for node in reversed(model.graph.node):
        if node.op_type in PASS_THROUGH and node.output[0] in reach:
            reach.add(node.input[0])
    return reach


def _fold_constants(model, weights=None) -> int:
    graph = model.graph
    opset = default_opset(model)
    protos = {t.name: t for t in graph.initializer}
    consts: dict[str, np.ndarray] = {}  # values, converted only when a fold needs them (weights rarely are)
    stored = {t.name for t in graph.initializer if t.data_type in FLOAT_TYPES}

    def value_of(name):
        if name not in consts:
            consts[name] = stored_array(protos[name], weights)
        return consts[name]

    feeders = _weight_feeders(model)
    shapes = shape_table(model)
    outputs = {o.name for o in graph.output}
    ctx = SimpleNamespace(training=False)
    keep, new_consts = [], []
    for node in graph.node:
        value = None
        present = [n for n in node.input if n]
        foldable = (
            node.domain in ("", "ai.onnx")
            and op_key(node.op_type) in OPS
            and not any(o in outputs for o in node.output)
            and not (node.op_type in PASS_THROUGH and node.output[0] in feeders and node.input[0] in stored)
            and node.op_type != "Dropout"
        )
        if foldable and node.op_type == "Shape" and node.input[0] in shapes:
            dims = shapes[node.input[0]]
            if dims and all(d is not None and d > 0 for d in dims):
                op = OpNode.from_proto(node, opset)
                start, end = op.attr("start", 0), op.attr("end", len(dims))
                value = [np.array(dims[start:end], dtype=np.int64)]
        elif foldable and present and all(n in consts or n in protos for n in present):
            op = OpNode.from_proto(node, opset)
            args = [None if not n else torch.from_numpy(np.array(value_of(n))) for n in node.input]
            try:
                result = OPS[op_key(node.op_type)](op, args, ctx)
            except Exception as e:  # leave it to run at lift time, where errors name the node
                log.debug("not folding %s %r: %s", node.op_type, node.name, e)
                result = None
            if result is not None:
                results = result if isinstance(result, tuple) else (result,)
                value = [r.detach().numpy() for r in results]
        if value is None:
            keep.append(node)
            continue
        for name, v in zip(node.output, value):
            if name:
                consts[name] = v
                new_consts.append(name)
    if len(keep) == len(graph.node):
        return 0
    used = {n for node in keep for n in node.input} | outputs
    del graph.node[:]
    graph.node.extend(keep)
    for name in new_consts:
        if name in used:
            graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(consts[name]), name))
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)
    return len(new_consts)
