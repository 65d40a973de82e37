"""Resize (opsets 10+) and Upsample (opsets 7-9): nearest and linear, any coordinate transformation mode.

Implemented separably per spatial axis with index arithmetic, so every ONNX coordinate mode and rounding rule is exact
(F.interpolate covers only some of them).
"""

from __future__ import annotations

import math

import torch

from ctprune.errors import GraphError
from ctprune.graph.ops import ints, register


def _source_coords(mode: str, out_size: int, in_size: int, scale: float, device) -> torch.Tensor:
    """ONNX's x_original for every output index along one axis."""
    x = torch.arange(out_size, dtype=torch.float64, device=device)
    if mode == "asymmetric":
        return x / scale
    if mode == "align_corners":
        return x * (in_size - 1) / (out_size - 1) if out_size > 1 else torch.zeros_like(x)
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out_size > 1 else torch.zeros_like(x)
    if mode in ("half_pixel", "half_pixel_symmetric"):
        if mode == "half_pixel_symmetric":
            adjustment = out_size / (scale * in_size)
            center = in_size / 2
            offset = center * (1 - adjustment)
            return offset + (x + 0.5) / scale - 0.5
        return (x + 0.5) / scale - 0.5
    raise ValueError(mode)


def _round(x: torch.Tensor, nearest_mode: str) -> torch.Tensor:
    if nearest_mode == "floor":
        return torch.floor(x)
    if nearest_mode == "ceil":
        return torch.ceil(x)
    if nearest_mode == "round_prefer_ceil":
        return torch.floor(x + 0.5)
    return torch.ceil(x - 0.5)  # round_prefer_floor


def resize_nd(x, out_sizes, scales, mode, coord_mode, nearest_mode, node_name):
    for axis in range(2, x.dim()):
        in_size, out_size, scale = x.shape[axis], out_sizes[axis], scales[axis]
        if in_size == out_size and scale == 1.0:
            continue
        src = _source_coords(coord_mode, out_size, in_size, scale, x.device)
        if mode == "nearest":
            index = _round(src, nearest_mode).clamp(0, in_size - 1).long()
            x = x.index_select(axis, index)
        elif mode == "linear":
            src = src.clamp(0, in_size - 1)
            lo = torch.floor(src).long()
            hi = (lo + 1).clamp(max=in_size - 1)
            shape = [1] * x.dim()
            shape[axis] = out_size
            w = (src - lo).to(x.dtype).reshape(shape)
            x = x.index_select(axis, lo) * (1 - w) + x.index_select(axis, hi) * w
        else:
            raise GraphError(f"Resize node {node_name!r}: mode {mode!r} is not supported (nearest and linear are)")
    return x


@register("Resize")
def resize(node, inputs, ctx):
    x = inputs[0]
    if node.opset < 11:
        scales_t, sizes_t = inputs[1], None
        coord_mode, nearest_mode = "asymmetric", "floor"
    else:
        scales_t = inputs[2] if len(inputs) > 2 else None
        sizes_t = inputs[3] if len(inputs) > 3 else None
        coord_mode = node.attr("coordinate_transformation_mode", "half_pixel")
        nearest_mode = node.attr("nearest_mode", "round_prefer_floor")
    if coord_mode == "tf_crop_and_resize":
        raise GraphError(f"Resize node {node.name!r}: tf_crop_and_resize is not supported")
    mode = node.attr("mode", "nearest")
    axes = node.attr("axes")
    rank = x.dim()
    if sizes_t is not None and sizes_t.numel():
        given = ints(sizes_t)
        sizes = list(x.shape)
        for a, s in zip(axes or range(rank), given):
            sizes[a % rank] = s
        scales = [sizes[i] / x.shape[i] for i in range(rank)]
    else:
        given = [float(v) for v in scales_t.reshape(-1).tolist()]
        scales = [1.0] * rank
        for a, s in zip(axes or range(rank), given):
            scales[a % rank] = s
        sizes = [int(math.floor(x.shape[i] * scales[i])) for i in range(rank)]
    return resize_nd(x, sizes, scales, mode, coord_mode, nearest_mode, node.name)


@register("Upsample")
def upsample(node, inputs, ctx):
    x = inputs[0]
    scales = [float(v) for v in inputs[1].reshape(-1).tolist()] if len(inputs) > 1 else list(node.attr("scales"))
    sizes = [int(math.floor(x.shape[i] * scales[i])) for i in range(x.dim())]
    return resize_nd(x, sizes, scales, node.attr("mode", "nearest"), "asymmetric", "floor", node.name)
