"""Channel groups on an ONNX graph: which channels must be cropped together.

A *channel space* is a run of channels that one producer creates (a Conv's or Gemm's output). Ops that tie channels
(residual Add/Sum, per-channel Mul/Add, depthwise Conv, BatchNormalization, pass-through activations) unite spaces; a
Concat lays spaces side by side; Flatten → Gemm turns each channel into a block of Gemm input features. United spaces
form a `ChannelGroup`: one keep-set per group.

Every tensor that carries channels on axis 1 gets a `Layout`: the segments (space, size) its channel axis is made of,
and `block`, how many consecutive features one channel covers (1 on NCHW tensors, H·W after a flatten).

The walk also records every constant that must be sliced when channels go (`Slice`), every Conv whose `group` attribute
follows its channel count, and every Reshape whose constant shape names a channel count. `crop.py` replays those.
The result is a `ChannelGraph`; it and the types it holds are defined in `channels.py`.

Groups touching graph inputs/outputs, or ops whose channel semantics we do not know, are *frozen* (never cropped) and the
reason is kept for the report. Ties that contradict each other (e.g. adding tensors whose channel layouts do not line
up) raise `GraphError` naming the nodes.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from ctprune.errors import GraphError
from ctprune.graph.constants import ConstantTable
from ctprune.graph.shapes import inferred_shape_table
from ctprune.pruning.precrop.channels import ChannelGraph, ChannelGroup, Layer, Layout, Slice

log = logging.getLogger(__name__)

# Ops whose output has the channel layout of their first input, element for element.
PASS_THROUGH = {
    "Relu", "LeakyRelu", "Elu", "Selu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softplus", "Softsign", "Mish",
    "Gelu", "Erf", "Exp", "Log", "Sqrt", "Abs", "Neg", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Identity",
    "Dropout", "Cast", "Clip", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
    "GlobalLpPool", "Upsample", "Resize", "BatchNormalization", "InstanceNormalization", "PRelu", "Celu", "ThresholdedRelu",
}
# Broadcasting element-wise ops: channel-bearing inputs are tied, constant inputs are per-channel parameters.
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Pow"}
# Per-channel parameter inputs of pass-through ops (input index → the parameter has one value per channel).
PER_CHANNEL_PARAMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}
# Ops that consume a tensor without looking at its channel count in a way that matters for the values.
HARMLESS_CONSUMERS = {"Shape", "Size"}


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def node_label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}->{node.output[0] if node.output else '?'}"


class _Walker:
    """One topological walk that assigns layouts and unites spaces (union-find)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.consts = ConstantTable(model.graph)
        self.shapes = inferred_shape_table(model)
        self.parent: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.label: dict[int, str] = {}
        self.frozen: dict[int, str] = {}
        self.members: dict[int, list[str]] = {}
        self.layouts: dict[str, Layout] = {}
        self.layers: list[Layer] = []
        self.slices: list[Slice] = []
        self.depthwise: dict[str, Layout] = {}
        self.reshapes: dict[str, tuple[int, Layout]] = {}

    # -- union-find over spaces -----------------------------------------------------------------------------------
    def new_space(self, n: int, label: str, frozen: str | None = None) -> int:
        sid = len(self.parent)
        self.parent[sid] = sid
        self.size[sid] = n
        self.label[sid] = label
        self.members[sid] = [label]
        if frozen:
            self.frozen[sid] = frozen
        return sid

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int, where: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise GraphError(
                f"{where} ties channels of {self.label[ra]!r} ({self.size[ra]}) with {self.label[rb]!r} "
                f"({self.size[rb]}), which have different channel counts"
            )
        keep, drop = min(ra, rb), max(ra, rb)
        self.parent[drop] = keep
        self.members[keep] += self.members.pop(drop)
        if drop in self.frozen and keep not in self.frozen:
            self.frozen[keep] = self.frozen[drop]
        self.frozen.pop(drop, None)

    def freeze(self, layout: Layout, reason: str) -> None:
        for space, _ in layout.segments:
            root = self.find(space)
            self.frozen.setdefault(root, reason)

    def unify(self, a: Layout, b: Layout, where: str) -> None:
        if a.block != b.block or [n for _, n in a.segments] != [n for _, n in b.segments]:
            if a.features == b.features and len(a.segments) == 1 and len(b.segments) == 1:
                pass
            else:
                raise GraphError(
                    f"{where} combines tensors whose channel layouts do not line up "
                    f"({self._describe(a)} vs {self._describe(b)}); ctprune cannot crop channels through it"
                )
        for (sa, _), (sb, _) in zip(a.segments, b.segments):
            self.union(sa, sb, where)

    def _describe(self, layout: Layout) -> str:
        segs = " + ".join(f"{self.label[self.find(s)]}[{n}]" for s, n in layout.segments)
        return segs + (f" x{layout.block}" if layout.block != 1 else "")

    # -- helpers ------------------------------------------------------------------------------------------------
    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return len(shape) if shape is not None else None

    def frozen_layout(self, name: str, reason: str) -> Layout | None:
        """A layout for a channel tensor we did not see produced (graph input, unknown op output)."""
        shape = self.shapes.get(name)
        if shape is None or len(shape) < 2 or shape[1] is None:
            return None
        layout = Layout(((self.new_space(shape[1], name, reason), shape[1]),))
        self.layouts[name] = layout
        return layout

    def layout_of(self, name: str, consumer: str) -> Layout | None:
        if name in self.layouts:
            return self.layouts[name]
        if name in self.consts or not name:
            return None
        return self.frozen_layout(name, f"its channels come from an op ctprune does not trace (seen at {consumer!r})")

    # -- the walk -----------------------------------------------------------------------------------------------
    def run(self) -> ChannelGraph:
        for inp in self.graph.input:
            if inp.name not in self.consts:
                self.frozen_layout(inp.name, f"graph input {inp.name!r}")
        for node in self.graph.node:
            self.visit(node)
        for out in self.graph.output:
            if out.name in self.layouts:
                self.freeze(self.layouts[out.name], f"graph output {out.name!r}")
        return self.result()

    def visit(self, node: onnx.NodeProto) -> None:
        op, label = node.op_type, node_label(node)
        if node.domain not in ("", "ai.onnx"):
            return self.unknown(node, label)
        if op == "Constant":
            return
        if op == "Conv":
            return self.conv(node, label)
        if op in ("Gemm", "MatMul"):
            return self.dense(node, label)
        if op in PASS_THROUGH:
            return self.pass_through(node, label)
        if op in ELEMENTWISE:
            return self.elementwise(node, label)
        if op == "Concat":
            return self.concat(node, label)
        if op in ("Flatten", "Reshape"):
            return self.flatten(node, label)
        if op in ("Squeeze", "Unsqueeze"):
            return self.squeeze(node, label)
        if op in ("ReduceMean", "ReduceMax", "ReduceSum", "ReduceMin", "ReduceL2", "ReduceL1"):
            return self.reduce(node, label)
        if op == "Pad":
            return self.pad(node, label)
        if op in HARMLESS_CONSUMERS:
            return
        return self.unknown(node, label)

    def unknown(self, node, label) -> None:
        reason = f"it reaches {node.op_type} node {label!r}, whose channel semantics ctprune does not know"
        for name in node.input:
            layout = self.layouts.get(name)
            if layout is not None:
                self.freeze(layout, reason)
        for name in node.output:
            self.frozen_layout(name, f"it comes from {node.op_type} node {label!r}")

    def conv(self, node, label) -> None:
        x, w = node.input[0], node.input[1]
        if w not in self.consts:
            raise GraphError(
                f"Conv node {label!r}: its weight {w!r} is computed by the graph, not a constant; "
                "fold constants first (ctprune.graph.normalize)"
            )
        wshape = self.consts.shape(w)
        c_out, c_in_per_group = wshape[0], wshape[1]
        kernel = int(np.prod(wshape[2:])) if len(wshape) > 2 else 1
        group = int(_attr(node, "group", 1))
        in_layout = self.layout_of(x, label)
        if in_layout is not None and in_layout.features != c_in_per_group * group:
            raise GraphError(f"Conv node {label!r}: input has {in_layout.features} channels, weight {w!r} "
                             f"expects {c_in_per_group * group}")
        if in_layout is None or in_layout.block != 1:
            in_layout = Layout(((self.new_space(c_in_per_group * group, f"{label}:in", f"input of {label!r}"),
                                 c_in_per_group * group),))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias and bias not in self.consts:
            raise GraphError(f"Conv node {label!r}: its bias {bias!r} is computed by the graph, not a constant; "
                             "fold constants first (ctprune.graph.normalize)")
        depthwise = group > 1 and c_in_per_group == 1 and c_out == group == in_layout.channels
        if group == 1:
            out_layout = Layout(((self.new_space(c_out, label), c_out),))
            self.slices.append(Slice(label, 1, w, 1, in_layout))
        elif depthwise:
            out_layout = in_layout
            self.depthwise[label] = in_layout
            self.members[self.find(in_layout.segments[0][0])].append(label)
        else:
            reason = f"grouped Conv {label!r} (group={group}) is kept whole"
            self.freeze(in_layout, reason)
            out_layout = Layout(((self.new_space(c_out, label, reason), c_out),))
        self.slices.append(Slice(label, 1, w, 0, out_layout))
        if bias:
            self.slices.append(Slice(label, 2, bias, 0, out_layout))
        self.layouts[node.output[0]] = out_layout
        self.layers.append(Layer(label, "Conv", w, kernel, in_layout, out_layout, depthwise, group,
                                 int(np.prod(wshape)), tuple(wshape[2:])))

    def dense(self, node, label) -> None:
        a, b = node.input[0], node.input[1]
        is_gemm = node.op_type == "Gemm"
        trans_a = is_gemm and _attr(node, "transA", 0)
        trans_b = is_gemm and _attr(node, "transB", 0)
        a_layout = self.layouts.get(a)
        if b not in self.consts or trans_a or len(self.consts.shape(b)) != 2 or self.rank(a) not in (2, None):
            return self.unknown(node, label)
        bshape = self.consts.shape(b)
        k, n = (bshape[1], bshape[0]) if trans_b else bshape
        if a_layout is None:
            a_layout = Layout(((self.new_space(k, f"{label}:in", f"input of {label!r}"), k),))
        if a_layout.features != k:
            raise GraphError(f"{node.op_type} node {label!r}: input has {a_layout.features} features, weight expects {k}")
        out_layout = Layout(((self.new_space(n, label), n),))
        self.slices.append(Slice(label, 1, b, 1 if trans_b else 0, a_layout))
        self.slices.append(Slice(label, 1, b, 0 if trans_b else 1, out_layout))
        if is_gemm and len(node.input) > 2 and node.input[2] and node.input[2] in self.consts:
            c = node.input[2]
            cshape = self.consts.shape(c)
            if cshape and cshape[-1] == n and n > 1:
                self.slices.append(Slice(label, 2, c, len(cshape) - 1, out_layout))
        self.layouts[node.output[0]] = out_layout
        self.layers.append(Layer(label, node.op_type, b, 1, a_layout, out_layout, weight_count=k * n))

    def pass_through(self, node, label) -> None:
        layout = self.layouts.get(node.input[0])
        if layout is None:
            return
        for slot in PER_CHANNEL_PARAMS.get(node.op_type, ()):
            if slot < len(node.input) and node.input[slot]:
                self.per_channel_param(node, label, slot, layout, self.rank(node.input[0]) or 4)
        if node.op_type == "PRelu":
            self.per_channel_param(node, label, 1, layout, self.rank(node.input[0]) or 4)
        if node.op_type == "Clip":
            for slot in (1, 2):
                if slot < len(node.input) and node.input[slot] and node.input[slot] in self.layouts:
                    return self.unknown(node, label)
        self.layouts[node.output[0]] = layout
        for extra in node.output[1:]:  # BN training outputs, Dropout mask: same channels
            if extra:
                self.layouts[extra] = layout

    def per_channel_param(self, node, label, slot, layout: Layout, rank: int) -> None:
        """Record a constant input that broadcasts against a channel tensor of `rank` (slice it if per-channel)."""
        name = node.input[slot]
        if name not in self.consts:  # a computed tensor with no channel layout: fine only if it broadcasts over C
            shape = self.shapes.get(name)
            if shape is not None:
                axis = 1 - (rank - len(shape))
                if axis < 0 or shape[axis] == 1:
                    return
            return self.unknown(node, label)
        shape = self.consts.shape(name)
        if node.op_type in PER_CHANNEL_PARAMS:
            axis = 0  # BN/InstanceNorm parameters are 1-D, one value per channel
        else:
            axis = 1 - (rank - len(shape))
        if axis < 0 or shape[axis] == 1:
            return
        if shape[axis] != layout.features:
            raise GraphError(
                f"{node.op_type} node {label!r}: constant {name!r} has {shape[axis]} values on the channel axis, "
                f"the tensor it meets has {layout.features}"
            )
        self.slices.append(Slice(label, slot, name, axis, layout))

    def elementwise(self, node, label) -> None:
        channel_inputs = [self.layouts[n] for n in node.input if n in self.layouts]
        if not channel_inputs:
            return
        widest = max(l.features for l in channel_inputs)
        # A single-channel tensor (e.g. a spatial attention map) broadcasts over the channels: no tie.
        tied = [l for l in channel_inputs if l.features == widest or widest == 1]
        base = tied[0]
        for other in tied[1:]:
            self.unify(base, other, f"{node.op_type} node {label!r}")
        rank = max((self.rank(n) or 0) for n in node.input if n in self.layouts) or 4
        for slot, name in enumerate(node.input):
            if name and name not in self.layouts:
                self.per_channel_param(node, label, slot, base, rank)
        self.layouts[node.output[0]] = base

    def concat(self, node, label) -> None:
        rank = self.rank(node.output[0]) or self.rank(node.input[0]) or 4
        axis = _attr(node, "axis", 1)
        axis = axis + rank if axis < 0 else axis
        layouts = [self.layouts.get(n) for n in node.input]
        if axis != 1:
            present = [l for l in layouts if l is not None]
            if present:
                for other in present[1:]:
                    self.unify(present[0], other, f"Concat node {label!r}")
                self.layouts[node.output[0]] = present[0]
            return
        if any(l is None for l in layouts) or len({l.block for l in layouts}) != 1:
            return self.unknown(node, label)
        segments = tuple(s for l in layouts for s in l.segments)
        self.layouts[node.output[0]] = Layout(segments, layouts[0].block)

    def flatten(self, node, label) -> None:
        layout = self.layouts.get(node.input[0])
        if layout is None:
            return
        in_shape, out_shape = self.shapes.get(node.input[0]), self.shapes.get(node.output[0])
        if node.op_type == "Flatten" and _attr(node, "axis", 1) != 1 or in_shape is None or out_shape is None:
            return self.unknown(node, label)
        if len(out_shape) < 2 or any(d is None for d in in_shape[1:]) or any(d is None for d in out_shape[1:]):
            return self.unknown(node, label)
        spatial_in = int(np.prod(in_shape[2:])) if len(in_shape) > 2 else 1
        if len(out_shape) == 2:  # [N, C*H*W]: each channel becomes a block of features
            new = Layout(layout.segments, layout.block * spatial_in)
        elif out_shape[1] == layout.channels and layout.block == 1:  # channel axis kept, spatial dims rearranged
            new = layout
        elif len(in_shape) == 2 and out_shape[1] == layout.features and all(d == 1 for d in out_shape[2:]):
            new = layout  # [N, F] → [N, F, 1, 1]
            if layout.block != 1:
                return self.unknown(node, label)
        else:
            return self.unknown(node, label)
        if node.op_type == "Reshape":
            shape_name = node.input[1]
            if shape_name not in self.consts:
                return self.unknown(node, label)
            target = self.consts.get(shape_name)
            if len(target) > 1 and target[1] not in (-1, 0):
                self.reshapes[label] = (1, new)
        self.layouts[node.output[0]] = new

    def squeeze(self, node, label) -> None:
        # Unsqueeze's axes index its output, Squeeze's its input.
        rank = self.rank(node.output[0] if node.op_type == "Unsqueeze" else node.input[0])
        self.axes_past_channels(node, label, rank, empty_means_all=False)

    def reduce(self, node, label) -> None:
        self.axes_past_channels(node, label, self.rank(node.input[0]), empty_means_all=True)

    def axes_past_channels(self, node, label, rank: int | None, empty_means_all: bool) -> None:
        """Squeeze/Unsqueeze/Reduce*: the output keeps the input's channels when every axis lies past axis 1.

        With `empty_means_all` (Reduce*) an empty list means every axis, the channel axis included."""
        layout = self.layouts.get(node.input[0])
        if layout is None:
            return
        axes = self.ints_attr_or_input(node, "axes")
        if axes is None or (empty_means_all and not axes) or rank is None:
            return self.unknown(node, label)
        axes = [a + rank if a < 0 else a for a in axes]
        if any(a <= 1 for a in axes):
            return self.unknown(node, label)
        self.layouts[node.output[0]] = layout

    def ints_attr_or_input(self, node, name: str) -> list[int] | None:
        """An int-list attribute, or the same list as constant input 1 (newer opsets); None when neither is there."""
        values = _attr(node, name)
        if values is None and len(node.input) > 1 and node.input[1] in self.consts:
            values = [int(v) for v in self.consts.get(node.input[1]).reshape(-1)]
        return values

    def pad(self, node, label) -> None:
        layout = self.layouts.get(node.input[0])
        if layout is None:
            return
        pads = self.ints_attr_or_input(node, "pads")
        rank = self.rank(node.input[0])
        if pads is None or rank is None or len(node.input) > 3 and node.input[3]:
            return self.unknown(node, label)
        if pads[1] != 0 or pads[rank + 1] != 0 or pads[0] != 0 or pads[rank] != 0:
            return self.unknown(node, label)
        self.layouts[node.output[0]] = layout

    def result(self) -> ChannelGraph:
        groups, space_group, root_key = {}, {}, {}
        for sid in self.parent:
            root = self.find(sid)
            if root not in root_key:
                key = self.label[root]
                key = key if key not in groups else f"{key}#{root}"
                root_key[root] = key
                groups[key] = ChannelGroup(key, self.size[root], self.members[root], self.frozen.get(root))
            space_group[sid] = root_key[root]
        return ChannelGraph(groups, space_group, dict(self.size), self.layers, self.slices, self.depthwise,
                            self.reshapes)


def channel_graph(model: onnx.ModelProto) -> ChannelGraph:
    """Find the channel groups, weight layers and per-channel constants of `model` (not modified)."""
    return _Walker(model).run()
