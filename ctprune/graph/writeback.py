"""Write trained tensors from a TrainableGraph back into a copy of the ORIGINAL model.

Only the tensors change: each trained parameter and BN running stat goes under its ONNX name into
1. the initializer of that name (keeping its data type; external data becomes inline), or
2. the Constant node producing it (its ``value`` attribute), or
3. any other constant-computing node producing it (e.g. ConstantOfShape placeholders): that node becomes a Constant
   node with the same name and output (logged, since the op type changes).
Node names, graph inputs/outputs, metadata and opsets stay as they were.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import onnx
import onnx.numpy_helper

from ctprune.errors import GraphError
from ctprune.graph.filebacked import materialized
from ctprune.graph.weightless import detached

__all__ = ["write_back", "trained_tensors", "without_trained", "set_tensor"]

log = logging.getLogger(__name__)


def trained_tensors(tg) -> dict[str, np.ndarray]:
    """ONNX name -> numpy value of every parameter and BN statistic of the lifted graph."""
    out = {}
    for name, t in list(tg.onnx_parameters().items()) + list(tg.onnx_buffers().items()):
        out[name] = t.detach().to("cpu").numpy()
    return out


def write_back(original: onnx.ModelProto, tg, tensors: dict[str, np.ndarray] | None = None,
               hold=()) -> onnx.ModelProto:
    """A copy of ``original`` carrying ``tg``'s tensors (or the given ``tensors``) under their names.

    Initializers named in ``hold`` stay placeholders (weightless.py) whose values the caller keeps: the rewrite
    reads a pruned layer's weight from there and writes only its compact form into the model."""
    values = trained_tensors(tg) if tensors is None else tensors
    # The initializers about to be replaced are not copied first: a protobuf arena keeps a replaced value's bytes
    # until the whole model is freed, so a full copy would hold every weight twice.
    model, _ = detached(original, names=values.keys())
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    hold = set(hold)
    for name, value in values.items():
        if name in hold and name in initializers:
            continue
        if name in initializers:
            init = initializers[name]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            _check_shape(name, list(init.dims), value)
            set_tensor(init, value.astype(dtype, copy=False), name)
        elif name in producers:
            node = producers[name]
            if node.op_type != "Constant":
                log.info("write_back: %s node %r becomes a Constant node holding trained %r", node.op_type, node.name, name)
            old = _constant_tensor(node)
            if old is not None:
                _check_shape(name, list(old.dims), value)
                value = value.astype(onnx.helper.tensor_dtype_to_np_dtype(old.data_type), copy=False)
            tensor = onnx.numpy_helper.from_array(value, name)
            new = onnx.helper.make_node("Constant", [], [name], name=node.name, value=tensor)
            node.CopyFrom(new)
        else:
            raise GraphError(f"write_back: the model has no initializer or node producing tensor {name!r}")
    return materialized(model)  # constants left in the input's file (file-backed loading) come inline


def without_trained(original: onnx.ModelProto, tg) -> onnx.ModelProto:
    """A copy of `original` holding no values for the tensors `tg` lifted as trainable (their initializers keep name,
    type and dims): enough for `write_back(copy, tg)`, without a second copy of every weight beside the module's."""
    names = set(tg.onnx_parameters()) | set(tg.onnx_buffers())
    light, _ = detached(original, names=names)
    return light


def set_tensor(target: onnx.TensorProto, value: np.ndarray, name: str) -> None:
    """target.CopyFrom(numpy_helper.from_array(value, name)) without the intermediate tensor's copy of the values
    (a 400 MB FC weight would be held three times at once) for the types from_array stores as raw bytes."""
    if value.dtype not in _RAW_TYPES or sys.byteorder != "little":
        target.CopyFrom(onnx.numpy_helper.from_array(value, name))
        return
    target.CopyFrom(onnx.numpy_helper.from_array(np.empty((), value.dtype), name))  # type and name
    target.dims.extend(value.shape)
    target.raw_data = np.ascontiguousarray(value).tobytes()


_RAW_TYPES = {np.dtype(t) for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
                                     np.uint8, np.uint16, np.uint32, np.uint64, np.bool_)}


def _constant_tensor(node) -> onnx.TensorProto | None:
    if node.op_type == "Constant":
        for a in node.attribute:
            if a.name == "value":
                return a.t
    return None


def _check_shape(name: str, dims: list[int], value: np.ndarray) -> None:
    if list(value.shape) != dims:
        raise GraphError(f"write_back: tensor {name!r} has shape {list(value.shape)}, the model holds {dims}")
