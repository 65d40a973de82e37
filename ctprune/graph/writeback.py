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

import numpy as np
import onnx
import onnx.numpy_helper

from ctprune.errors import GraphError

__all__ = ["write_back", "trained_tensors"]

log = logging.getLogger(__name__)


def trained_tensors(tg) -> dict[str, np.ndarray]:
    """ONNX name -> numpy value of every parameter and BN statistic of the lifted graph."""
    out = {}
    for name, t in list(tg.onnx_parameters().items()) + list(tg.onnx_buffers().items()):
        out[name] = t.detach().to("cpu").numpy()
    return out


def write_back(original: onnx.ModelProto, tg, tensors: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A copy of ``original`` carrying ``tg``'s tensors (or the given ``tensors``) under their names."""
    values = trained_tensors(tg) if tensors is None else tensors
    model = onnx.ModelProto()
    model.CopyFrom(original)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    for name, value in values.items():
        if name in initializers:
            init = initializers[name]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            _check_shape(name, list(init.dims), value)
            init.CopyFrom(onnx.numpy_helper.from_array(value.astype(dtype, copy=False), name))
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
    return model


def _constant_tensor(node) -> onnx.TensorProto | None:
    if node.op_type == "Constant":
        for a in node.attribute:
            if a.name == "value":
                return a.t
    return None


def _check_shape(name: str, dims: list[int], value: np.ndarray) -> None:
    if list(value.shape) != dims:
        raise GraphError(f"write_back: tensor {name!r} has shape {list(value.shape)}, the model holds {dims}")
