"""Static facts about the Conv layers of a model: shapes, attributes, MACs and consumers, at the model's input shape.

Computed from shape inference alone (no weight values are materialised), so it is cheap even on models whose weights
are placeholders computed by ConstantOfShape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import onnx

from ctprune.errors import GraphError
from ctprune.graph.constants import constant_dims
from ctprune.graph.normalize import drop_initializer_inputs, set_input_shapes
from ctprune.graph.ops.nn import same_pads
from ctprune.graph.shapes import infer_shapes, shape_table
from ctprune.ops.names import DOMAIN as CTPRUNE_DOMAIN

__all__ = ["ConvLayer", "FCLayer", "ConvAttributes", "conv_attributes", "conv_layers", "fc_layers", "shaped_model"]


@dataclass(frozen=True)
class ConvAttributes:
    """A Conv node's attributes with the ONNX defaults filled in. `kernel_shape` is the attribute, else the weight's
    spatial dims when they were given, else None; the defaults of strides, dilations and pads follow its rank
    (2-D when unknown). `pads` are the attribute's; `resolved_pads` applies auto_pad."""

    kernel_shape: tuple[int, ...] | None
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    group: int
    auto_pad: str

    def resolved_pads(self, spatial=None) -> tuple[int, ...] | None:
        """Explicit [begins..., ends...]: auto_pad SAME_* needs the static input `spatial` size and the kernel
        (None without them); VALID is zeros; NOTSET the attribute."""
        if self.auto_pad == "NOTSET":
            return self.pads
        if self.auto_pad == "VALID":
            return (0,) * len(self.pads)
        if not spatial or any(not isinstance(d, int) for d in spatial) or not self.kernel_shape:
            return None
        return tuple(same_pads(self.auto_pad, list(spatial), self.kernel_shape, self.strides, self.dilations))


def conv_attributes(node: onnx.NodeProto, weight_dims=None) -> ConvAttributes:
    """The one parser of Conv attributes (graph facts, the PatternConv and SparseConv rewrites)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    kernel = attrs.get("kernel_shape")
    if kernel is None and weight_dims is not None:
        kernel = weight_dims[2:]
    kernel = tuple(int(k) for k in kernel) if kernel is not None else None
    n = len(kernel) if kernel is not None else 2
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    return ConvAttributes(
        kernel_shape=kernel,
        strides=tuple(int(s) for s in attrs.get("strides", [1] * n)),
        dilations=tuple(int(d) for d in attrs.get("dilations", [1] * n)),
        pads=tuple(int(p) for p in attrs.get("pads", [0] * (2 * n))),
        group=int(attrs.get("group", 1)),
        auto_pad=auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad,
    )


@dataclass
class ConvLayer:
    """One Conv node. Shapes are per sample (no batch dim) at the model's input shape."""

    node_name: str
    weight_name: str
    bias_name: str | None
    in_channels: int
    out_channels: int
    kernel_shape: tuple[int, ...]
    group: int
    strides: tuple[int, ...]
    pads: tuple[int, ...]  # ONNX order [begins..., ends...], auto_pad resolved
    dilations: tuple[int, ...]
    input_shape: tuple | None
    output_shape: tuple | None
    macs: int | None
    consumers: list[str] = field(default_factory=list)
    output_name: str = ""

    @property
    def params(self) -> int:
        return self.out_channels * (self.in_channels // self.group) * math.prod(self.kernel_shape) + (
            self.out_channels if self.bias_name else 0
        )

    @property
    def is_pattern_prunable(self) -> bool:
        """3x3, group 1: what PatternConv can take."""
        return tuple(self.kernel_shape) == (3, 3) and self.group == 1


def layer_key(node: onnx.NodeProto) -> str:
    """How ctprune names a layer: its node's name, or for an unnamed node (legal ONNX, common in older exports) the
    name of its output, which is unique in a graph. The rewriter finds a layer by either."""
    return node.name or node.output[0]


def shaped_model(model: onnx.ModelProto, input_shape=None) -> onnx.ModelProto:
    """A copy with the input shape applied, batch fixed to 1 where dynamic, and shapes inferred."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    drop_initializer_inputs(m)
    if input_shape is not None:
        set_input_shapes(m, input_shape)
    for vi in m.graph.input:  # per-sample numbers: a dynamic batch counts as 1
        _batch_of_one(vi)
    declared = {vi.name: vi for vi in m.graph.value_info}
    del m.graph.value_info[:]
    if input_shape is None:
        # onnx's inference does not see through ctprune's ops (their functions rebuild weights from attributes): the
        # types the rewriter kept for their outputs still hold when the input shape is the stored one
        for node in (n for n in m.graph.node if n.domain == CTPRUNE_DOMAIN):
            for name in (o for o in node.output if o in declared):
                vi = m.graph.value_info.add()
                vi.CopyFrom(declared[name])
                _batch_of_one(vi)
    return infer_shapes(m)


def _batch_of_one(vi: onnx.ValueInfoProto) -> None:
    dims = vi.type.tensor_type.shape.dim
    if len(dims) > 0 and not dims[0].HasField("dim_value"):
        dims[0].Clear()
        dims[0].dim_value = 1


def conv_layers(model: onnx.ModelProto, input_shape=None) -> list[ConvLayer]:
    """Every Conv node of ``model`` in graph order."""
    m = shaped_model(model, input_shape)
    shapes = shape_table(m)
    shapes.update(constant_dims(m.graph))
    consumers: dict[str, list[str]] = {}
    for node in m.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(layer_key(node))
    layers = []
    for node in m.graph.node:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        w_shape = shapes.get(node.input[1])
        if not w_shape or any(d is None for d in w_shape):
            raise GraphError(f"Conv node {node.name!r}: the shape of its weight {node.input[1]!r} is unknown")
        out_ch, in_per_group = w_shape[0], w_shape[1]
        attrs = conv_attributes(node, w_shape)
        kernel, group, strides, dilations = attrs.kernel_shape, attrs.group, attrs.strides, attrs.dilations
        x_shape = shapes.get(node.input[0])
        y_shape = shapes.get(node.output[0])
        pads = (attrs.resolved_pads(x_shape[2:]) if x_shape else None) or attrs.pads
        y_sample = tuple(y_shape[1:]) if y_shape else None
        macs = None
        if y_sample and None not in y_sample[1:]:
            macs = out_ch * math.prod(y_sample[1:]) * in_per_group * math.prod(kernel)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        layers.append(
            ConvLayer(
                node_name=layer_key(node),
                weight_name=node.input[1],
                bias_name=bias,
                in_channels=in_per_group * group,
                out_channels=out_ch,
                kernel_shape=kernel,
                group=group,
                strides=strides,
                pads=pads,
                dilations=dilations,
                input_shape=tuple(x_shape[1:]) if x_shape else None,
                output_shape=y_sample,
                macs=macs,
                consumers=consumers.get(node.output[0], []),
                output_name=node.output[0],
            )
        )
    return layers


@dataclass
class FCLayer:
    """One fully connected layer: a Gemm, or a MatMul whose second input is a stored 2-D weight."""

    node_name: str
    op_type: str  # "Gemm" or "MatMul"
    weight_name: str
    bias_name: str | None
    in_features: int
    out_features: int
    transposed: bool  # the stored weight is (I, O) (MatMul, Gemm transB=0); False: (O, I)
    output_name: str
    is_head: bool  # its result reaches a graph output through shape/activation ops only: the classifier
    why_not: str | None = None  # why no SparseConv can take it (None: it can)

    @property
    def params(self) -> int:
        return self.in_features * self.out_features

    @property
    def macs(self) -> int:  # per sample
        return self.in_features * self.out_features


# Ops through which a layer's output still "is" the model's output (the classifier head ends in these).
_HEAD_TAIL = ("Softmax", "LogSoftmax", "Identity", "Reshape", "Flatten", "Sigmoid", "Relu", "Add", "Squeeze",
              "Dropout")


def _reaches_output(model: onnx.ModelProto, name: str, readers: dict[str, list]) -> bool:
    outputs = {o.name for o in model.graph.output}
    seen = set()
    while name not in seen:
        seen.add(name)
        if name in outputs:
            return True
        nodes = readers.get(name, [])
        if len(nodes) != 1 or nodes[0].op_type not in _HEAD_TAIL:
            return False
        name = nodes[0].output[0]
    return False


def fc_layers(model: onnx.ModelProto, input_shape=None) -> list[FCLayer]:
    """Every Gemm and every MatMul with a stored 2-D weight (initializer or Constant) as second input, in graph order."""
    m = shaped_model(model, input_shape)
    shapes = shape_table(m)
    stored = constant_dims(m.graph)
    for node in m.graph.node:  # placeholder weights (onnx's light models) are stored tensors once folded
        if node.op_type == "ConstantOfShape" and shapes.get(node.output[0]) and None not in shapes[node.output[0]]:
            stored[node.output[0]] = list(shapes[node.output[0]])
    readers: dict[str, list] = {}
    for node in m.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    layers = []
    for node in m.graph.node:
        if node.op_type not in ("Gemm", "MatMul") or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        w_shape = stored.get(node.input[1])
        if w_shape is None or len(w_shape) != 2:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        transposed = node.op_type == "MatMul" or not int(attrs.get("transB", 0))
        in_f, out_f = (w_shape[0], w_shape[1]) if transposed else (w_shape[1], w_shape[0])
        why = None
        x_shape = shapes.get(node.input[0])
        if node.op_type == "Gemm" and int(attrs.get("transA", 0)):
            why = "Gemm with transA=1"
        elif node.op_type == "Gemm" and float(attrs.get("alpha", 1.0)) != 1.0:
            why = "Gemm with alpha != 1"
        elif x_shape is None or len(x_shape) != 2:
            why = "input is not 2-D (N, features)"
        elif node.input[0] in stored:
            why = "both inputs are stored tensors"
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        if bias is not None and why is None:
            b_shape = stored.get(bias)
            beta = float(attrs.get("beta", 1.0))
            if b_shape is None or math.prod(b_shape) != out_f or beta != 1.0:
                why = "bias is not a stored (O,) vector with beta 1"
        layers.append(FCLayer(layer_key(node), node.op_type, node.input[1], bias, int(in_f), int(out_f), transposed,
                              node.output[0], _reaches_output(m, node.output[0], readers), why))
    return layers
