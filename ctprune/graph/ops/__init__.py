"""Torch implementations of ONNX ops: one small function per op, looked up by op type.

Every function has the signature ``fn(node, inputs, ctx) -> Tensor | tuple[Tensor, ...]``:
- ``node`` is an :class:`OpNode` (attributes already decoded, the model's opset for the node's domain),
- ``inputs`` holds one entry per ONNX input, ``None`` for an omitted optional input,
- ``ctx`` is the running module (``ctx.training`` says train or eval).

Static arguments (shapes, axes, pads) arrive as CPU integer tensors and are read with :func:`ints`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import onnx
import torch

__all__ = ["OpNode", "OPS", "register", "ints", "is_supported", "op_key"]

OPS: dict[str, Callable] = {}


@dataclass
class OpNode:
    """One ONNX node in the form the interpreter runs it."""

    name: str
    op_type: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    opset: int = 13

    @classmethod
    def from_proto(cls, node: onnx.NodeProto, opset: int) -> "OpNode":
        attrs = {}
        for a in node.attribute:
            value = onnx.helper.get_attribute_value(a)
            if isinstance(value, bytes):
                value = value.decode("utf-8")
            elif isinstance(value, list) and value and isinstance(value[0], bytes):
                value = [v.decode("utf-8") for v in value]
            attrs[a.name] = value
        return cls(node.name, node.op_type, node.domain, list(node.input), list(node.output), attrs, opset)

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)


def op_key(op_type: str, domain: str = "") -> str:
    return op_type if domain in ("", "ai.onnx") else f"{domain}.{op_type}"


def register(*op_types: str):
    def wrap(fn):
        for t in op_types:
            OPS[t] = fn
        return fn

    return wrap


def ints(t) -> list[int]:
    """A static integer argument (tensor, array or list) as a Python list."""
    if t is None:
        return []
    if isinstance(t, torch.Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in list(t)]


def is_supported(op_type: str, domain: str = "") -> bool:
    return op_key(op_type, domain) in OPS


# Importing the modules fills OPS.
from ctprune.graph.ops import elementwise, nn, resize, tensor  # noqa: E402,F401
