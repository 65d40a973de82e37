"""`ctprune inspect`: a per-layer table of a model's compute layers, at the model's input shape.

    rows, totals = layer_table(load_model("model.onnx"))
    print(render_table(rows, totals))

Shapes come from shape inference alone (weights are never materialised), so this is fast even on big models.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import onnx

from ctprune.errors import UnsupportedOpsError
from ctprune.graph.constants import constant_dims
from ctprune.graph.layers import conv_layers, shaped_model
from ctprune.graph.lift import check_supported
from ctprune.graph.shapes import shape_table
from ctprune.graph.weightless import FLOAT_TYPES
from ctprune.ops import pattern_layout

__all__ = ["LayerRow", "layer_table", "render_table", "count_parameters"]


@dataclass
class LayerRow:
    name: str
    op: str
    kernel: str  # "3x3", or "" for dense layers
    in_channels: int
    out_channels: int
    groups: int
    params: int
    macs: int | None  # per sample
    prunable: bool  # ctprune would prune it (form "pattern" or "sparse")
    form: str = "dense"  # what `ctprune --method auto` would make of it: "pattern", "sparse" or "dense"
    why: str = ""  # why it stays dense


def count_parameters(model: onnx.ModelProto) -> int:
    """Elements of every stored float tensor: initializers, Constant nodes and ConstantOfShape placeholders."""
    total = sum(math.prod(t.dims) for t in model.graph.initializer if t.data_type in FLOAT_TYPES)
    shape_values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer
                    if t.data_type == onnx.TensorProto.INT64 and len(t.dims) == 1}
    # zeros a ScatterElements fills with stored weights (a dense weight rebuilt at load) hold no parameters
    scaffolds = {n.input[0] for n in model.graph.node if n.op_type == "ScatterElements"}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type in FLOAT_TYPES:
                    total += math.prod(a.t.dims)
        elif node.op_type == "ConstantOfShape" and node.input[0] in shape_values and node.output[0] not in scaffolds:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is None or value.data_type in FLOAT_TYPES:
                total += int(math.prod(int(d) for d in shape_values[node.input[0]]))
    return total


def _dense_rows(model: onnx.ModelProto, input_shape) -> list[LayerRow]:
    """Gemm, MatMul with a stored weight, and ConvTranspose."""
    m = shaped_model(model, input_shape)
    stored = constant_dims(m.graph)
    shapes = shape_table(m)
    shapes.update(stored)
    rows = []
    for node in m.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm":
            w = shapes.get(node.input[1])
            if not w or None in w:
                continue
            k, n = (w[1], w[0]) if attrs.get("transB", 0) else (w[0], w[1])
            bias = math.prod(shapes.get(node.input[2]) or [0]) if len(node.input) > 2 and node.input[2] else 0
            rows.append(LayerRow(node.name, "Gemm", "", k, n, 1, k * n + bias, k * n, False))
        elif node.op_type == "MatMul":
            a, w = shapes.get(node.input[0]), shapes.get(node.input[1])
            if node.input[1] not in stored or len(w) != 2:  # activation x activation: not a layer
                continue
            rows_per_sample = math.prod(a[1:-1]) if a and None not in a[1:-1] else 1
            rows.append(LayerRow(node.name, "MatMul", "", w[0], w[1], 1, w[0] * w[1], rows_per_sample * w[0] * w[1], False))
        elif node.op_type == "PatternConv" and node.domain == "ai.ctprune":
            rows.append(_pattern_conv_row(node, attrs, shapes))
        elif node.op_type == "SparseConv" and node.domain == "ai.ctprune":
            rows.append(_sparse_conv_row(node, attrs, shapes))
        elif node.op_type == "ConvTranspose":
            w, x = shapes.get(node.input[1]), shapes.get(node.input[0])
            if not w or None in w:
                continue
            group = int(attrs.get("group", 1))
            kernel = w[2:]
            macs = w[0] * w[1] * math.prod(kernel) * math.prod(x[2:]) if x and None not in x[2:] else None
            bias = w[1] * group if len(node.input) > 2 and node.input[2] else 0
            rows.append(LayerRow(node.name, "ConvTranspose", "x".join(map(str, kernel)), w[0], w[1] * group, group,
                                 math.prod(w) + bias, macs, False))
    return rows


def _pattern_conv_row(node, attrs, shapes) -> LayerRow:
    """ctprune's own pruned 3x3 conv (ops/PatternConv.md): K kept kernels of 4 taps each."""
    out_ch, in_ch = list(attrs["weight_shape"])[:2]
    kept = pattern_layout.kept_kernels(attrs)
    bias = out_ch if len(node.input) > 2 and node.input[2] else 0
    x = shapes.get(node.input[0])
    macs = None
    if x and len(x) == 4 and None not in x[2:]:
        top, left, bottom, right = list(attrs.get("pads", [0, 0, 0, 0]))
        sh, sw = list(attrs.get("strides", [1, 1]))
        oh, ow = (x[2] + top + bottom - 3) // sh + 1, (x[3] + left + right - 3) // sw + 1
        macs = kept * 4 * oh * ow
    return LayerRow(node.name, "PatternConv", "3x3", in_ch, out_ch, 1, kept * 4 + bias, macs, False)


def _forms(model, convs, input_shape, method: str, prune_head: bool) -> tuple[dict, dict]:
    """({layer: form}, {layer: why dense}) as the pruning engine decides them (pruning/layers.py)."""
    import torch

    from ctprune.graph.layers import fc_layers
    from ctprune.pruning.layers import decide_layers

    fcs = fc_layers(model, input_shape) if method != "pattern" else []
    # the lift makes every stored weight (Constant, initializer, folded ConstantOfShape) a Parameter
    stored = {name: torch.empty(dims, device="meta") for name, dims in constant_dims(model.graph).items()}
    for layer in convs:
        if layer.weight_name not in stored and layer.kernel_shape:
            stored[layer.weight_name] = torch.empty(
                (layer.out_channels, layer.in_channels // layer.group, *layer.kernel_shape), device="meta")
    for layer in fcs:
        stored.setdefault(layer.weight_name, torch.empty((layer.in_features, layer.out_features), device="meta"))
    decision = decide_layers(convs, fcs, stored, method=method, prune_head=prune_head)
    return {n: decision.form(n) for n in list(decision.weights) + list(decision.skipped)}, decision.skipped


def _sparse_conv_row(node, attrs, shapes) -> LayerRow:
    """ctprune's own sparse Conv / FC (ops/SparseConv.md): stored (K, block) values, padding lanes included."""
    weight_shape = list(attrs["weight_shape"])
    values = shapes.get(node.input[1]) or [0, 0]
    kept = int(values[0]) * int(values[1])
    bias = weight_shape[0] if len(node.input) > 4 and node.input[4] else 0
    y = shapes.get(node.output[0])  # known once shaped_model keeps the types of ctprune ops' outputs
    pixels = math.prod(y[2:]) if y and len(y) == 4 and None not in y[2:] else 1
    kernel = "x".join(map(str, weight_shape[2:])) if len(weight_shape) == 4 else ""
    in_ch = weight_shape[1] * int(attrs.get("group", 1))
    return LayerRow(node.name, "SparseConv", kernel, in_ch, weight_shape[0], int(attrs.get("group", 1)), kept + bias,
                    kept * pixels, False)


def layer_table(model: onnx.ModelProto, input_shape=None, method: str = "auto",
                prune_head: bool = False) -> tuple[list[LayerRow], dict]:
    """(rows in graph order, totals). Totals: params (whole model), macs (listed layers, per sample), layer and
    prunable counts, prunable params, the input shape used, and unsupported ops ({op: [nodes]}, empty if none).
    Each row says the form `method` would give the layer (pattern / sparse / dense and why)."""
    convs = conv_layers(model, input_shape)
    rows_by_name = {}
    for c in convs:
        rows_by_name[c.node_name] = LayerRow(
            c.node_name, "Conv", "x".join(map(str, c.kernel_shape)), c.in_channels, c.out_channels, c.group,
            c.params, c.macs, c.is_pattern_prunable,
        )
    for r in _dense_rows(model, input_shape):
        rows_by_name[r.name] = r
    forms, why = _forms(model, convs, input_shape, method, prune_head)
    for r in rows_by_name.values():
        r.form = forms.get(r.name, "dense")
        r.prunable = r.form != "dense"
        r.why = why.get(r.name, "")
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    rows = sorted(rows_by_name.values(), key=lambda r: order.get(r.name, 0))
    try:
        check_supported(model)
        unsupported = {}
    except UnsupportedOpsError as e:  # ctprune's own ops are not a problem for inspect
        unsupported = {op: nodes for op, nodes in e.unsupported.items() if not op.startswith("ai.ctprune.")}
    m = shaped_model(model, input_shape)
    inits = {t.name for t in m.graph.initializer}
    data_inputs = [i for i in m.graph.input if i.name not in inits]
    in_shape = shape_table(m).get(data_inputs[0].name) if data_inputs else None
    in_shape = list(in_shape) if in_shape is not None else None
    totals = {
        "params": count_parameters(model),
        "macs": sum(r.macs or 0 for r in rows),
        "layers": len(rows),
        "prunable_layers": sum(r.prunable for r in rows),
        "prunable_params": sum(r.params for r in rows if r.prunable),
        "by_form": ", ".join(f"{sum(r.form == f for r in rows)} {f}" for f in ("pattern", "sparse")),
        "input_shape": in_shape,
        "unsupported": unsupported,
    }
    return rows, totals


def _num(n) -> str:
    return "?" if n is None else f"{n:,}"


def render_table(rows: list[LayerRow], totals: dict) -> str:
    name_w = min(max([len(r.name) for r in rows] + [5]), 48)
    head = f"{'layer':<{name_w}}  {'op':<13} {'kernel':>6} {'in':>6} {'out':>6} {'groups':>6} {'params':>13} " \
           f"{'MACs':>15}  {'form':<7} why dense"
    lines = [head, "-" * len(head)]
    for r in rows:
        name = r.name if len(r.name) <= name_w else "..." + r.name[-(name_w - 3):]
        lines.append(
            f"{name:<{name_w}}  {r.op:<13} {r.kernel:>6} {r.in_channels:>6} {r.out_channels:>6} {r.groups:>6} "
            f"{_num(r.params):>13} {_num(r.macs):>15}  {r.form:<7} {r.why}"
        )
    lines.append("-" * len(head))
    shape = "x".join("N" if d in (None, 1) and i == 0 else str(d) for i, d in enumerate(totals["input_shape"] or []))
    lines.append(
        f"total: {totals['layers']} layers ({totals['prunable_layers']} prunable: {totals['by_form']}, holding "
        f"{_num(totals['prunable_params'])} params); model params {_num(totals['params'])}; "
        f"{totals['macs'] / 1e9:.2f} G MACs per sample at input {shape or '?'}"
    )
    if totals["unsupported"]:
        lines.append(str(UnsupportedOpsError(totals["unsupported"])))
    return "\n".join(lines)


def rows_as_dicts(rows: list[LayerRow]) -> list[dict]:
    return [asdict(r) for r in rows]
