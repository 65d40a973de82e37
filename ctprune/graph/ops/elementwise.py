"""Activations, arithmetic with numpy-style broadcasting, casts and pass-throughs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from onnx import TensorProto

from ctprune.graph.ops import register

# ONNX TensorProto data type -> torch dtype, for Cast and ConstantOfShape.
TORCH_DTYPES = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.INT64: torch.int64,
    TensorProto.INT32: torch.int32,
    TensorProto.INT16: torch.int16,
    TensorProto.INT8: torch.int8,
    TensorProto.UINT8: torch.uint8,
    TensorProto.BOOL: torch.bool,
}


def _same_device(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Integer constants live on the CPU; bring them to the data's device when they meet.
    return b.to(a.device) if b.device != a.device and b.dim() > 0 else b


def _binary(fn):
    def run(node, inputs, ctx):
        a, b = inputs[0], inputs[1]
        return fn(a, _same_device(a, b))

    return run


register("Add")(_binary(torch.add))
register("Sub")(_binary(torch.sub))
register("Mul")(_binary(torch.mul))
register("Pow")(_binary(torch.pow))
register("Equal")(_binary(torch.eq))
register("Less")(_binary(torch.lt))
register("Greater")(_binary(torch.gt))


@register("Div")
def div(node, inputs, ctx):
    a, b = inputs[0], _same_device(inputs[0], inputs[1])
    if not a.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")  # ONNX integer Div truncates
    return a / b


def _variadic(fn):
    def run(node, inputs, ctx):
        out = inputs[0]
        for x in inputs[1:]:
            out = fn(out, _same_device(out, x))
        return out

    return run


register("Sum")(_variadic(torch.add))
register("Max")(_variadic(torch.maximum))
register("Min")(_variadic(torch.minimum))


@register("Mean")
def mean(node, inputs, ctx):
    return _variadic(torch.add)(node, inputs, ctx) / len(inputs)


def _unary(fn):
    def run(node, inputs, ctx):
        return fn(inputs[0])

    return run


for _name, _fn in {
    "Relu": F.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Reciprocal": torch.reciprocal,
    "Erf": torch.erf,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Softplus": F.softplus,
    "Not": torch.logical_not,
}.items():
    register(_name)(_unary(_fn))


@register("Identity")
def identity(node, inputs, ctx):
    return inputs[0]


@register("LeakyRelu")
def leaky_relu(node, inputs, ctx):
    return F.leaky_relu(inputs[0], node.attr("alpha", 0.01))


@register("Elu")
def elu(node, inputs, ctx):
    return F.elu(inputs[0], node.attr("alpha", 1.0))


@register("PRelu")
def prelu(node, inputs, ctx):
    x, slope = inputs
    return torch.where(x >= 0, x, x * slope)  # slope broadcasts numpy-style, as ONNX says


@register("HardSigmoid")
def hard_sigmoid(node, inputs, ctx):
    return F.hardtanh(inputs[0] * node.attr("alpha", 0.2) + node.attr("beta", 0.5), 0.0, 1.0)


@register("HardSwish")
def hard_swish(node, inputs, ctx):
    return F.hardswish(inputs[0])


def _scalar_bound(bound: torch.Tensor | None, x: torch.Tensor):
    """A one-element constant bound on the CPU as a Python float, else the tensor (on x's device and dtype)."""
    if bound is None:
        return None
    if bound.numel() == 1 and not bound.requires_grad and bound.device.type == "cpu":
        return float(bound)
    return bound.to(x.device, x.dtype)


@register("Clip")
def clip(node, inputs, ctx):
    x = inputs[0]
    if node.opset < 11:  # bounds are attributes
        lo, hi = node.attr("min", float("-inf")), node.attr("max", float("inf"))
    else:
        lo = _scalar_bound(inputs[1] if len(inputs) > 1 else None, x)
        hi = _scalar_bound(inputs[2] if len(inputs) > 2 else None, x)
    if lo is None and hi is None:
        return x
    if isinstance(lo, float) and isinstance(hi, float) and lo <= hi:
        # hardtanh is clamp forward; its backward is one fused kernel, where clamp's with tensor bounds is five
        # (ReLU6 layers took 45% of a MobileNetV2 training step on the CPU)
        return F.hardtanh(x, lo, hi)
    return torch.clamp(x, lo, hi)


def _softmax_like(fn):
    def run(node, inputs, ctx):
        x = inputs[0]
        if node.opset < 13:
            # Before opset 13 the input is coerced to 2-D [prod(dims[:axis]), prod(dims[axis:])].
            axis = node.attr("axis", 1) % max(x.dim(), 1)
            flat = x.reshape(int(torch.tensor(x.shape[:axis]).prod()), -1)
            return fn(flat, dim=1).reshape(x.shape)
        return fn(x, dim=node.attr("axis", -1))

    return run


register("Softmax")(_softmax_like(torch.softmax))
register("LogSoftmax")(_softmax_like(torch.log_softmax))


@register("Dropout")
def dropout(node, inputs, ctx):
    x = inputs[0]
    if node.opset >= 12:
        ratio = float(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else 0.5
    else:
        ratio = node.attr("ratio", 0.5)
    y = F.dropout(x, ratio, training=ctx.training) if ratio > 0 else x
    if len(node.outputs) > 1 and node.outputs[1]:
        return y, torch.ones_like(x, dtype=torch.bool)
    return y


@register("Cast")
def cast(node, inputs, ctx):
    return inputs[0].to(TORCH_DTYPES[node.attr("to")])


@register("Where")
def where(node, inputs, ctx):
    cond, a, b = inputs
    return torch.where(cond.to(a.device), a, _same_device(a, b))
