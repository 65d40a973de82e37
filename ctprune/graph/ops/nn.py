"""Convolutions, normalisation, pooling and dense layers.

ONNX pads are ``[begin_1..begin_n, end_1..end_n]`` and may be asymmetric; torch's own ``padding=`` is symmetric only, so
asymmetric pads are applied explicitly with ``F.pad`` and the torch op then runs with ``padding=0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ctprune.errors import GraphError
from ctprune.graph.ops import register

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def same_pads(auto_pad: str, in_sizes, kernel, strides, dilations) -> list[int]:
    """Explicit [begins..., ends...] for auto_pad SAME_UPPER / SAME_LOWER / VALID."""
    n = len(in_sizes)
    if auto_pad == "VALID":
        return [0] * (2 * n)
    begins, ends = [], []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else big)
        ends.append(big if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def window_attrs(node, x: torch.Tensor, kernel) -> tuple[list[int], list[int], list[int]]:
    """strides, dilations and explicit pads of a Conv/Pool node for input x."""
    n = x.dim() - 2
    strides = list(node.attr("strides", [1] * n))
    dilations = list(node.attr("dilations", [1] * n))
    auto_pad = node.attr("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        pads = same_pads(auto_pad, list(x.shape[2:]), kernel, strides, dilations)
    else:
        pads = list(node.attr("pads", [0] * (2 * n)))
    return strides, dilations, pads


def torch_pad_order(pads: list[int]) -> list[int]:
    """ONNX [b1..bn, e1..en] -> F.pad's (b_n, e_n, ..., b_1, e_1)."""
    n = len(pads) // 2
    out = []
    for i in reversed(range(n)):
        out += [pads[i], pads[n + i]]
    return out


def split_pads(x, pads, value=0.0):
    """Symmetric pads go to torch's padding=, asymmetric ones are applied here."""
    n = len(pads) // 2
    if pads[:n] == pads[n:]:
        return x, pads[:n]
    return F.pad(x, torch_pad_order(pads), value=value), [0] * n


@register("Conv")
def conv(node, inputs, ctx):
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    strides, dilations, pads = window_attrs(node, x, list(w.shape[2:]))
    x, padding = split_pads(x, pads)
    return _CONV[x.dim() - 2](x, w, b, strides, padding, dilations, node.attr("group", 1))


@register("ConvTranspose")
def conv_transpose(node, inputs, ctx):
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    n = x.dim() - 2
    kernel = list(w.shape[2:])
    strides = list(node.attr("strides", [1] * n))
    dilations = list(node.attr("dilations", [1] * n))
    out_pad = list(node.attr("output_padding", [0] * n))
    full = [s * (i - 1) + (k - 1) * d + 1 for i, k, s, d in zip(x.shape[2:], kernel, strides, dilations)]
    output_shape = node.attr("output_shape")
    auto_pad = node.attr("auto_pad", "NOTSET")
    if output_shape or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = list(output_shape)[-n:] if output_shape else [i * s for i, s in zip(x.shape[2:], strides)]
        totals = [f + op - t for f, op, t in zip(full, out_pad, target)]
        upper = auto_pad == "SAME_UPPER"  # NOTSET with output_shape puts the odd pad at the start, like SAME_LOWER
        begins = [t // 2 if upper else t - t // 2 for t in totals]
        pads = begins + [t - bg for t, bg in zip(totals, begins)]
    elif auto_pad == "VALID":
        pads = [0] * (2 * n)
    else:
        pads = list(node.attr("pads", [0] * (2 * n)))
    y = _CONV_T[n](x, w, None, strides, 0, 0, node.attr("group", 1), dilations)
    if any(out_pad):
        y = F.pad(y, torch_pad_order([0] * n + out_pad))
    index = [slice(None), slice(None)] + [slice(pads[i], y.shape[2 + i] - pads[n + i]) for i in range(n)]
    y = y[tuple(index)]
    if b is not None:
        y = y + b.reshape([1, -1] + [1] * n)
    return y


@register("BatchNormalization")
def batch_norm(node, inputs, ctx):
    x, scale, bias, mean, var = inputs[:5]
    # ONNX: running = running * momentum + batch * (1 - momentum); torch's momentum is the batch's weight.
    momentum = 1.0 - node.attr("momentum", 0.9)
    return F.batch_norm(x, mean, var, scale, bias, ctx.training, momentum, node.attr("epsilon", 1e-5))


@register("InstanceNormalization")
def instance_norm(node, inputs, ctx):
    x, scale, bias = inputs
    return F.instance_norm(x, weight=scale, bias=bias, eps=node.attr("epsilon", 1e-5))


@register("MaxPool")
def max_pool(node, inputs, ctx):
    x = inputs[0]
    if len(node.outputs) > 1 and node.outputs[1]:
        raise GraphError(f"MaxPool node {node.name!r}: the Indices output is not supported")
    kernel = list(node.attr("kernel_shape"))
    strides, dilations, pads = window_attrs(node, x, kernel)
    x, padding = split_pads(x, pads, value=float("-inf"))
    return _MAXPOOL[x.dim() - 2](x, kernel, strides, padding, dilations, ceil_mode=bool(node.attr("ceil_mode", 0)))


@register("AveragePool")
def average_pool(node, inputs, ctx):
    x = inputs[0]
    kernel = list(node.attr("kernel_shape"))
    strides, dilations, pads = window_attrs(node, x, kernel)
    if any(d != 1 for d in dilations):
        raise GraphError(f"AveragePool node {node.name!r}: dilations are not supported")
    n = x.dim() - 2
    ceil_mode = bool(node.attr("ceil_mode", 0))
    if not any(pads) and not ceil_mode:
        return _AVGPOOL[n](x, kernel, strides)
    # Sum over each window, then divide by the count ONNX asks for: the padded window (count_include_pad, clipped at
    # the padded border) or only the real elements.
    order = torch_pad_order(pads)
    total = _window_sum(F.pad(x, order), kernel, strides, ceil_mode)
    ones = torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
    fill = 1.0 if node.attr("count_include_pad", 0) else 0.0
    return total / _window_sum(F.pad(ones, order, value=fill), kernel, strides, ceil_mode)


def _window_sum(x, kernel, strides, ceil_mode):
    if x.dim() == 3:  # 1-D pooling runs as 2-D with a unit height (avg_pool1d has no divisor_override)
        return _window_sum(x.unsqueeze(2), [1] + kernel, [1] + strides, ceil_mode).squeeze(2)
    return _AVGPOOL[x.dim() - 2](x, kernel, strides, 0, ceil_mode, True, divisor_override=1)


@register("GlobalAveragePool")
def global_average_pool(node, inputs, ctx):
    x = inputs[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@register("GlobalMaxPool")
def global_max_pool(node, inputs, ctx):
    x = inputs[0]
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


@register("LRN")
def lrn(node, inputs, ctx):
    x = inputs[0]
    size = node.attr("size")
    alpha, beta, bias = node.attr("alpha", 1e-4), node.attr("beta", 0.75), node.attr("bias", 1.0)
    # ONNX window over channels: [c - floor((size-1)/2), c + ceil((size-1)/2)] (torch's differs for even sizes).
    front, back = (size - 1) // 2, size - 1 - (size - 1) // 2
    n, c = x.shape[0], x.shape[1]
    sq = F.pad(x.pow(2).reshape(n, 1, c, -1), (0, 0, front, back))
    square_sum = F.avg_pool2d(sq, (size, 1), stride=1) * size
    return x / (bias + alpha / size * square_sum.reshape(x.shape)).pow(beta)


@register("Gemm")
def gemm(node, inputs, ctx):
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    if node.attr("transA", 0):
        a = a.t()
    if node.attr("transB", 0):
        b = b.t()
    y = a @ b
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


@register("MatMul")
def matmul(node, inputs, ctx):
    return torch.matmul(inputs[0], inputs[1])
