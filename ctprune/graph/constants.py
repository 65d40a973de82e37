"""Constant tensors of a graph by name: the one lookup the lift's preparation, the precrop surgery, the rewrite and
the report share.

A constant is an initializer or the output of a default-domain Constant node (any of its value forms: `value`,
`value_float(s)`, `value_int(s)`). Exporters deduplicate equal weights into one initializer read through Identity
nodes: a table built with `aliases=True` also answers for those Identity outputs (the channel crop needs that; the
rewrite, which only folds what a Conv reads directly, does not).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ctprune.graph.ops.tensor import constant_value
from ctprune.graph.weightless import stored_array

__all__ = ["ConstantTable", "constant_dims"]

_VALUE_FORMS = ("value", "value_float", "value_floats", "value_int", "value_ints")


def _is_constant_node(node: onnx.NodeProto) -> bool:
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) > 0


class ConstantTable:
    """Constant tensors of a graph by name, indexed once (a lookup per question, not a scan of every node)."""

    def __init__(self, graph: onnx.GraphProto, aliases: bool = True, held: dict | None = None):
        """`held`: {initializer name: array} values of initializers that are placeholders (weightless.py)."""
        self.held = held or {}
        self.initializers = {t.name: t for t in graph.initializer}
        self.constant_nodes: dict[str, onnx.NodeProto] = {}
        self.aliases: dict[str, str] = {}
        for node in graph.node:
            if _is_constant_node(node):
                if any(a.name in _VALUE_FORMS for a in node.attribute):
                    self.constant_nodes[node.output[0]] = node
            elif aliases and node.op_type == "Identity" and node.input and node.output and node.input[0] in self:
                self.aliases[node.output[0]] = self.aliases.get(node.input[0], node.input[0])

    def __contains__(self, name: str) -> bool:
        return name in self.initializers or name in self.constant_nodes or name in self.aliases

    def get(self, name: str) -> np.ndarray:
        name = self.aliases.get(name, name)
        if name in self.initializers:
            return stored_array(self.initializers[name], self.held)
        node = self.constant_nodes[name]
        return np.asarray(constant_value({a.name: helper.get_attribute_value(a) for a in node.attribute}))

    def value(self, name: str) -> np.ndarray | None:
        """The value of `name`, or None when it is not a constant."""
        return self.get(name) if name in self else None

    def shape(self, name: str) -> tuple[int, ...]:
        name = self.aliases.get(name, name)
        if name in self.initializers:
            return tuple(self.initializers[name].dims)
        tensor = self._tensor_attribute(name)
        return tuple(tensor.dims) if tensor is not None else self.get(name).shape

    def set(self, name: str, value: np.ndarray) -> None:
        if name in self.aliases:
            raise KeyError(f"{name!r} is an alias of {self.aliases[name]!r}; copy it instead of setting it")
        if name in self.initializers:
            self.initializers[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))
            return
        node = self.constant_nodes[name]
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.ascontiguousarray(value))))

    def _tensor_attribute(self, name: str) -> onnx.TensorProto | None:
        for attr in self.constant_nodes[name].attribute:
            if attr.name == "value":
                return attr.t
        return None


def constant_dims(graph: onnx.GraphProto, dtypes=None) -> dict[str, list[int]]:
    """Name -> dims of every initializer and Constant node holding a tensor (`value`); with `dtypes`, only those
    element types. Reads no weight values."""
    dims = {t.name: list(t.dims) for t in graph.initializer if dtypes is None or t.data_type in dtypes}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and (dtypes is None or a.t.data_type in dtypes):
                    dims[node.output[0]] = list(a.t.dims)
    return dims
