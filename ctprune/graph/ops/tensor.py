"""Shape and layout ops: reshape, slicing, concatenation, padding, reductions, shape arithmetic, constants."""

from __future__ import annotations

import math

import numpy as np
import onnx.numpy_helper
import torch
import torch.nn.functional as F

from ctprune.graph.ops import ints, register
from ctprune.graph.ops.nn import torch_pad_order


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


@register("Flatten")
def flatten(node, inputs, ctx):
    x = inputs[0]
    axis = _axis(node.attr("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), -1) if axis > 0 else x.reshape(1, -1)


@register("Reshape")
def reshape(node, inputs, ctx):
    x = inputs[0]
    shape = ints(inputs[1]) if node.opset >= 5 else list(node.attr("shape"))
    if not node.attr("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]  # 0 copies the input's dim
    return x.reshape(shape)


@register("Transpose")
def transpose(node, inputs, ctx):
    x = inputs[0]
    perm = node.attr("perm") or list(reversed(range(x.dim())))
    return x.permute(*perm)


@register("Concat")
def concat(node, inputs, ctx):
    parts = [t for t in inputs if t is not None and t.numel() > 0] or [inputs[0]]
    device = next((t.device for t in parts if t.device.type != "cpu"), parts[0].device)
    return torch.cat([t.to(device) for t in parts], dim=node.attr("axis"))


@register("Split")
def split(node, inputs, ctx):
    x = inputs[0]
    axis = _axis(node.attr("axis", 0), x.dim())
    if node.opset < 13:
        sizes = list(node.attr("split", []))
    else:
        sizes = ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else []
    if not sizes:
        parts = node.attr("num_outputs", len(node.outputs))
        chunk = -(-x.shape[axis] // parts)  # opset 18: the last part may be smaller
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(parts)]
    return tuple(torch.split(x, sizes, dim=axis))


@register("Slice")
def slice_(node, inputs, ctx):
    x = inputs[0]
    if node.opset < 10:
        starts, ends = list(node.attr("starts")), list(node.attr("ends"))
        axes = list(node.attr("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = ints(inputs[1]), ints(inputs[2])
        axes = ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
        steps = ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _axis(axis, x.dim())
        size = x.shape[axis]
        start = start + size if start < 0 else start
        end = end + size if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), size), min(max(end, 0), size)
            x = x.narrow(axis, start, max(end - start, 0))[(slice(None),) * axis + (slice(None, None, step),)]
        else:
            start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
            index = torch.arange(start, end, step, device=x.device)
            x = x.index_select(axis, index)
    return x


def _axes_arg(node, inputs, attr_before: int):
    """Axes given as an attribute before opset ``attr_before`` and as the second input from then on."""
    if node.opset < attr_before:
        return node.attr("axes")
    return ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else None


@register("Squeeze")
def squeeze(node, inputs, ctx):
    x = inputs[0]
    axes = _axes_arg(node, inputs, 13)
    if not axes:
        return x.reshape([d for d in x.shape if d != 1])
    axes = {_axis(a, x.dim()) for a in axes}
    return x.reshape([d for i, d in enumerate(x.shape) if i not in axes])


@register("Unsqueeze")
def unsqueeze(node, inputs, ctx):
    x = inputs[0]
    axes = _axes_arg(node, inputs, 13)
    rank = x.dim() + len(axes)
    shape = list(x.shape)
    for a in sorted(_axis(a, rank) for a in axes):
        shape.insert(a, 1)
    return x.reshape(shape)


@register("Pad")
def pad(node, inputs, ctx):
    x = inputs[0]
    if node.opset < 11:
        pads, value = list(node.attr("pads")), node.attr("value", 0.0)
    else:
        pads = ints(inputs[1])
        value = float(inputs[2].reshape(-1)[0]) if len(inputs) > 2 and inputs[2] is not None and inputs[2].numel() else 0.0
        if len(inputs) > 3 and inputs[3] is not None:  # opset 18: pads only for the listed axes
            axes = [_axis(a, x.dim()) for a in ints(inputs[3])]
            full = [0] * (2 * x.dim())
            for i, a in enumerate(axes):
                full[a], full[x.dim() + a] = pads[i], pads[len(axes) + i]
            pads = full
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}[
        node.attr("mode", "constant")
    ]
    order = torch_pad_order(pads)
    while order and order[-1] == 0 and order[-2] == 0:  # drop untouched leading dims: torch pads trailing dims only
        order = order[:-2]
    if not order:
        return x
    if mode == "constant":
        return F.pad(x, order, value=value)
    return F.pad(x, order, mode=mode)


def _reduce(fn):
    def run(node, inputs, ctx):
        x = inputs[0]
        attr_until = 13 if node.op_type == "ReduceSum" else 18
        axes = _axes_arg(node, inputs, attr_until)
        keep = bool(node.attr("keepdims", 1))
        if not axes:
            if node.attr("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, [_axis(a, x.dim()) for a in axes], keep)

    return run


register("ReduceMean")(_reduce(lambda x, axes, keep: x.mean(dim=axes, keepdim=keep)))
register("ReduceSum")(_reduce(lambda x, axes, keep: x.sum(dim=axes, keepdim=keep)))
register("ReduceMax")(_reduce(lambda x, axes, keep: x.amax(dim=axes, keepdim=keep)))
register("ReduceMin")(_reduce(lambda x, axes, keep: x.amin(dim=axes, keepdim=keep)))


@register("Shape")
def shape(node, inputs, ctx):
    dims = list(inputs[0].shape)
    start, end = node.attr("start", 0), node.attr("end", len(dims))
    return torch.tensor(dims[start:end], dtype=torch.int64)


@register("Size")
def size(node, inputs, ctx):
    return torch.tensor(inputs[0].numel(), dtype=torch.int64)


@register("Gather")
def gather(node, inputs, ctx):
    data, indices = inputs
    axis = _axis(node.attr("axis", 0), data.dim())
    idx = indices.to(data.device).long()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = data.index_select(axis, idx.reshape(-1))
    return out.reshape(tuple(data.shape[:axis]) + tuple(idx.shape) + tuple(data.shape[axis + 1 :]))


@register("Constant")
def constant(node, inputs, ctx):
    return torch.from_numpy(np.array(constant_value(node.attrs)))


def constant_value(attrs: dict) -> np.ndarray:
    """The value of a Constant node from its (decoded) attributes."""
    if "value" in attrs:
        return onnx.numpy_helper.to_array(attrs["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                       ("value_ints", np.int64)):
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    raise ValueError(f"Constant attributes {sorted(attrs)} are not supported")


@register("ConstantOfShape")
def constant_of_shape(node, inputs, ctx):
    value = node.attr("value")
    fill = torch.from_numpy(onnx.numpy_helper.to_array(value).copy()) if value is not None else torch.zeros(1)
    return fill.reshape(()).expand(ints(inputs[0])).clone()


@register("Expand")
def expand(node, inputs, ctx):
    x = inputs[0]
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(ints(inputs[1]))))


@register("Tile")
def tile(node, inputs, ctx):
    return inputs[0].repeat(ints(inputs[1]))


@register("Range")
def range_(node, inputs, ctx):
    start, limit, delta = (t.reshape(()).item() for t in inputs)
    return torch.arange(start, limit, delta, dtype=inputs[0].dtype)
