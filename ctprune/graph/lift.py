"""Lift an ONNX graph to a trainable torch module that interprets it node by node.

    tg = lift(load_model("model.onnx"))
    y = tg(x)                            # eval: equals onnxruntime
    tg.onnx_parameters()["conv1.weight"]  # an nn.Parameter, keyed by the ONNX tensor name

Constants are sorted once, at lift time:
- float tensors feeding a weight slot (Conv/ConvTranspose/Gemm/MatMul/BatchNormalization/InstanceNormalization/PRelu,
  see normalize.WEIGHT_SLOTS), directly or through a pass-through op -> ``nn.Parameter``;
- BatchNormalization running mean/var -> buffers, updated in train mode;
- other float constants -> non-persistent buffers (they follow ``.to(device)``);
- integer constants (shapes, axes, indices) -> plain CPU tensors, read as static arguments.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from torch import nn

from ctprune.errors import GraphError, UnsupportedOpsError
from ctprune.graph.load import default_opset
from ctprune.graph.normalize import BN_STAT_SLOTS, PASS_THROUGH, WEIGHT_SLOTS, normalize
from ctprune.graph.ops import OPS, OpNode, op_key
from ctprune.graph.shapes import shape_table
from ctprune.graph.weightless import detached, stored_array

__all__ = ["lift", "TrainableGraph", "check_supported"]

log = logging.getLogger(__name__)


def check_supported(model: onnx.ModelProto) -> None:
    """Raise UnsupportedOpsError naming every unsupported op type and its nodes (before any work)."""
    missing: dict[str, list[str]] = {}
    for i, node in enumerate(model.graph.node):
        key = op_key(node.op_type, node.domain)
        if key not in OPS:
            missing.setdefault(key, []).append(node.name or f"#{i} ({node.op_type})")
    if missing:
        raise UnsupportedOpsError(missing)


def lift(model, input_shape=None) -> "TrainableGraph":
    """A TrainableGraph for ``model``: a ModelProto (not modified), or a path/bytes given to load_model.

    ``input_shape`` fixes the data input's shape (None entries stay dynamic), e.g. for models whose H/W are symbolic.
    """
    if not isinstance(model, onnx.ModelProto):
        from ctprune.graph.load import load_model

        model = load_model(model)
    check_supported(model)
    # The preparation passes run on a copy without the large weights; the module reads those from `model` itself.
    light, weights = detached(model)
    return TrainableGraph(normalize(light, input_shape, weights=weights), stored=weights)


def _attr_name(prefix: str, onnx_name: str, taken: set[str]) -> str:
    # Module attribute names may not contain '.', and ONNX names often do.
    base = prefix + re.sub(r"\W", "_", onnx_name)
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


class TrainableGraph(nn.Module):
    """An ONNX graph as an nn.Module: forward(*inputs) runs the nodes in topological order."""

    def __init__(self, model: onnx.ModelProto, stored=None):
        """`stored`: {name: TensorProto} for the initializers of `model` that are placeholders (weightless.py)."""
        super().__init__()
        graph = model.graph
        opset = default_opset(model)
        self.graph_name = graph.name
        init_names = {t.name for t in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in init_names]
        self.output_names = [o.name for o in graph.output]
        shapes = shape_table(model)
        self.input_shapes = [tuple(shapes.get(n, [])) for n in self.input_names]
        self.nodes = [OpNode.from_proto(n, opset if n.domain in ("", "ai.onnx") else 1) for n in graph.node]
        check_supported(model)

        weights, stats = self._weight_names(graph)
        self._attr_of: dict[str, str] = {}  # ONNX name -> attribute holding it
        self._param_names: list[str] = []
        self._stat_names: list[str] = []
        self._static: dict[str, torch.Tensor] = {}
        taken: set[str] = set()
        for init in graph.initializer:
            array = stored_array(init, stored)
            value = torch.from_numpy(array if array.flags.writeable else array.copy())
            name = init.name
            if name in weights and value.is_floating_point():
                attr = _attr_name("p_", name, taken)
                self.register_parameter(attr, nn.Parameter(value))
                self._param_names.append(name)
            elif name in stats and value.is_floating_point():
                attr = _attr_name("s_", name, taken)
                self.register_buffer(attr, value)
                self._stat_names.append(name)
            elif value.is_floating_point():
                attr = _attr_name("c_", name, taken)
                self.register_buffer(attr, value, persistent=False)
            else:
                self._static[name] = value
                continue
            self._attr_of[name] = attr
        self._last_use = self._last_uses()
        # Optional modules applied to a node's first output (e.g. training-time normalisation after a pruned Conv).
        self.output_modules = nn.ModuleDict()
        self._output_module_of: dict[str, str] = {}

    @staticmethod
    def _weight_names(graph) -> tuple[set[str], set[str]]:
        producer = {o: n for n in graph.node for o in n.output}
        weights, stats = set(), set()
        for node in graph.node:
            for i in WEIGHT_SLOTS.get(node.op_type, ()):
                if i < len(node.input) and node.input[i]:
                    name = node.input[i]
                    while name in producer and producer[name].op_type in PASS_THROUGH:
                        name = producer[name].input[0]  # the stored tensor behind a Transpose/Reshape chain
                    weights.add(name)
            for i in BN_STAT_SLOTS.get(node.op_type, ()):
                if i < len(node.input) and node.input[i]:
                    stats.add(node.input[i])
        return weights, stats - weights

    def _last_uses(self) -> dict[int, list[str]]:
        """Node index -> values no later node needs (freed during eval to keep memory flat on big models)."""
        last = {}
        for i, node in enumerate(self.nodes):
            for name in node.inputs:
                last[name] = i
        keep = set(self.output_names)
        freed: dict[int, list[str]] = {}
        for name, i in last.items():
            if name not in keep and name not in self._attr_of and name not in self._static:
                freed.setdefault(i, []).append(name)
        return freed

    # ---- the public views keyed by ONNX names -------------------------------------------------------------------
    def onnx_parameters(self) -> dict[str, nn.Parameter]:
        return {name: getattr(self, self._attr_of[name]) for name in self._param_names}

    def onnx_buffers(self) -> dict[str, torch.Tensor]:
        """BatchNormalization running means and variances."""
        return {name: getattr(self, self._attr_of[name]) for name in self._stat_names}

    def onnx_tensor(self, name: str) -> torch.Tensor:
        """Any constant of the lifted graph by its ONNX name."""
        if name in self._attr_of:
            return getattr(self, self._attr_of[name])
        return self._static[name]

    # ---- running ------------------------------------------------------------------------------------------------
    def forward(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.input_names):
            raise GraphError(
                f"the graph takes {len(self.input_names)} input(s) {self.input_names}, got {len(inputs)}"
            )
        env: dict[str, torch.Tensor] = dict(zip(self.input_names, inputs))
        for name, attr in self._attr_of.items():
            env[name] = getattr(self, attr)
        env.update(self._static)
        free = not torch.is_grad_enabled()
        for i, node in enumerate(self.nodes):
            args = [env[n] if n else None for n in node.inputs]
            try:
                result = OPS[op_key(node.op_type, node.domain)](node, args, self)
            except GraphError:
                raise
            except Exception as e:
                shapes = [tuple(a.shape) if a is not None else None for a in args]
                raise GraphError(
                    f"node {node.name!r} ({node.op_type}) failed on input shapes {shapes}: {e}"
                ) from e
            results = result if isinstance(result, tuple) else (result,)
            if node.name in self._output_module_of:
                results = (self.output_modules[self._output_module_of[node.name]](results[0]), *results[1:])
            for name, value in zip(node.outputs, results):
                if name:
                    env[name] = value
            if free:
                for name in self._last_use.get(i, ()):
                    env.pop(name, None)
        outs = tuple(env[n] for n in self.output_names)
        return outs[0] if len(outs) == 1 else outs

    def attach_output_module(self, node_name: str, module: nn.Module) -> None:
        """Apply `module` to the first output of node `node_name` in every forward (None detaches)."""
        key = _attr_name("m_", node_name, set(self.output_modules.keys()))
        self.output_modules[key] = module
        self._output_module_of[node_name] = key

    def detach_output_modules(self) -> None:
        self.output_modules = nn.ModuleDict()
        self._output_module_of = {}

    def extra_repr(self) -> str:
        return (
            f"graph={self.graph_name!r}, nodes={len(self.nodes)}, parameters={len(self._param_names)}, "
            f"inputs={self.input_names}, outputs={self.output_names}"
        )
