"""Each torch op implementation against onnxruntime, one small single-node model per case (opset variants too)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import rel_err, run_ort
from ctprune.graph import lift, load_model

F32 = np.float32
I64 = np.int64


def case(op, x_shape, attrs=None, consts=(), opset=13, n_out=1, x2_shape=None, positive=False):
    """(op, data input shape(s), attributes, constant inputs [(name, array) or None for an empty slot], opset)."""
    return pytest.param(op, x_shape, attrs or {}, consts, opset, n_out, x2_shape, positive,
                        id=f"{op}-o{opset}-{len(consts)}c-{'-'.join(map(str, attrs or {}))}")


CASES = [
    case("Conv", [2, 4, 9, 9], {"group": 2, "strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2]},
         [("w", (6, 2, 3, 3)), ("b", (6,))]),
    case("Conv", [1, 3, 10, 7], {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, [("w", (5, 3, 4, 3))]),
    case("Conv", [1, 3, 10, 7], {"auto_pad": "SAME_LOWER", "strides": [3, 2]}, [("w", (5, 3, 2, 2))]),
    case("Conv", [2, 3, 11], {"pads": [2, 1]}, [("w", (4, 3, 3))]),
    case("ConvTranspose", [1, 4, 5, 6], {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 0]},
         [("w", (4, 3, 3, 3)), ("b", (3,))]),
    case("ConvTranspose", [1, 4, 5, 5], {"strides": [2, 2], "group": 2, "output_shape": [10, 11]},
         [("w", (4, 2, 3, 3))]),
    case("ConvTranspose", [1, 2, 5, 5], {"strides": [2, 2], "auto_pad": "SAME_UPPER"}, [("w", (2, 3, 4, 4))]),
    case("BatchNormalization", [2, 3, 4, 4], {"epsilon": 1e-3},
         [("s", (3,)), ("b", (3,)), ("m", (3,)), ("v", np.array([0.5, 1.0, 2.0], F32))], opset=9),
    case("LeakyRelu", [2, 5], {"alpha": 0.2}),
    case("PRelu", [2, 3, 4, 4], {}, [("slope", (3, 1, 1))]),
    case("Clip", [3, 7], {"min": -0.3, "max": 0.5}, opset=9),
    case("Clip", [3, 7], {}, [("lo", np.array(-0.2, F32)), ("hi", np.array(0.4, F32))], opset=13),
    case("Clip", [3, 7], {}, [None, ("hi", np.array(0.4, F32))], opset=13),
    case("Clip", [3, 7], {}, [("lo", np.array(0.4, F32)), ("hi", np.array(-0.2, F32))], opset=13),  # min > max
    case("HardSigmoid", [3, 7], {"alpha": 0.3, "beta": 0.4}),
    case("HardSwish", [3, 7], {}, opset=14),
    case("Softmax", [2, 3, 4], {"axis": 1}, opset=11),  # 2-D coercion semantics
    case("Softmax", [2, 3, 4], {"axis": 1}, opset=13),
    case("Sigmoid", [4, 4]), case("Tanh", [4, 4]),
    case("Add", [2, 3, 4, 5], {}, [("c", (3, 1, 1))]),
    case("Sub", [2, 3], x2_shape=[3]), case("Mul", [2, 1, 4], x2_shape=[3, 1]), case("Div", [2, 3], x2_shape=[2, 3]),
    case("Pow", [2, 3], {}, [("e", np.array(2.0, F32))], positive=True),
    case("Sum", [2, 3], x2_shape=[1, 3]), case("Max", [2, 3], x2_shape=[2, 3]), case("Min", [2, 3], x2_shape=[3]),
    case("MaxPool", [1, 2, 9, 9], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 0, 0], "ceil_mode": 1}),
    case("MaxPool", [1, 2, 8, 8], {"kernel_shape": [2, 2], "auto_pad": "SAME_UPPER", "strides": [3, 3]}),
    case("MaxPool", [1, 2, 9, 9], {"kernel_shape": [2, 2], "dilations": [2, 2]}, opset=12),
    case("AveragePool", [1, 2, 9, 9], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                                       "count_include_pad": 1}),
    case("AveragePool", [1, 2, 9, 9], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 1, 2]}),
    case("AveragePool", [1, 2, 10, 10], {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, opset=10),
    case("AveragePool", [1, 2, 12], {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}),
    case("GlobalAveragePool", [2, 3, 5, 4]), case("GlobalMaxPool", [2, 3, 5, 4]),
    case("ReduceMean", [2, 3, 4, 5], {"axes": [2, 3], "keepdims": 1}, opset=13),
    case("ReduceMean", [2, 3, 4, 5], {"keepdims": 0}, [("axes", np.array([-1, 1], I64))], opset=18),
    case("Flatten", [2, 3, 4, 5], {"axis": 2}),
    case("Reshape", [2, 3, 4, 5], {}, [("shape", np.array([0, -1, 5], I64))]),
    case("Transpose", [2, 3, 4, 5], {"perm": [0, 2, 3, 1]}),
    case("Concat", [2, 3, 4], {"axis": 1}, x2_shape=[2, 5, 4]),
    case("Split", [2, 6, 4], {"axis": 1, "split": [2, 4]}, opset=11, n_out=2),
    case("Split", [2, 6, 4], {"axis": 1}, [("split", np.array([1, 5], I64))], opset=13, n_out=2),
    case("Split", [2, 7, 4], {"axis": 1, "num_outputs": 3}, opset=18, n_out=3),
    case("Slice", [5, 6, 7], {"starts": [1, -4], "ends": [100, -1], "axes": [0, 2]}, opset=9),
    case("Slice", [5, 6, 7], {}, [("st", np.array([4, 1], I64)), ("en", np.array([-100, 6], I64)),
                                  ("ax", np.array([0, -1], I64)), ("sp", np.array([-2, 2], I64))]),
    case("Squeeze", [2, 1, 3, 1], {"axes": [1]}, opset=11),
    case("Squeeze", [2, 1, 3, 1], {}, [("axes", np.array([-1], I64))]),
    case("Unsqueeze", [2, 3], {"axes": [0, 3]}, opset=11),
    case("Unsqueeze", [2, 3], {}, [("axes", np.array([1, -1], I64))]),
    case("Pad", [1, 2, 4, 5], {"pads": [0, 0, 1, 2, 0, 0, 2, 1], "mode": "constant", "value": 0.5}, opset=9),
    case("Pad", [1, 2, 4, 5], {"mode": "reflect"}, [("p", np.array([0, 0, 1, 2, 0, 0, 2, 1], I64))]),
    case("Pad", [1, 2, 4, 5], {"mode": "edge"}, [("p", np.array([0, 0, 1, 2, 0, 0, 2, 1], I64))]),
    case("Pad", [1, 2, 4, 5], {}, [("p", np.array([1, 3, 0, 1], I64)), ("v", np.array(1.5, F32)),
                                   ("a", np.array([1, 3], I64))], opset=18),
    case("Upsample", [1, 2, 3, 4], {"mode": "nearest"}, [("sc", np.array([1, 1, 2, 3], F32))], opset=9),
    case("Upsample", [1, 2, 3, 4], {"mode": "linear"}, [("sc", np.array([1, 1, 2, 2], F32))], opset=9),
    case("Resize", [1, 2, 3, 4], {"mode": "nearest"},
         [("roi", np.array([], F32)), ("sc", np.array([1, 1, 2, 2], F32))], opset=11),
    case("Resize", [1, 2, 3, 4], {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                                  "nearest_mode": "floor"}, [None, None, ("sz", np.array([1, 2, 7, 9], I64))],
         opset=13),
    case("Resize", [1, 2, 5, 4], {"mode": "linear"}, [None, ("sc", np.array([1, 1, 1.5, 2.5], F32))], opset=13),
    case("Resize", [1, 2, 5, 4], {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
         [None, ("sc", np.array([1, 1, 2, 2], F32))], opset=13),
    case("Resize", [1, 2, 5, 4], {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
         [None, None, ("sz", np.array([1, 2, 3, 7], I64))], opset=13),
    case("Resize", [1, 2, 3, 4], {"mode": "nearest"}, [("sc", np.array([1, 1, 2, 2], F32))], opset=10),
    case("Gemm", [3, 4], {"transB": 1, "alpha": 0.5, "beta": 2.0}, [("B", (5, 4)), ("C", (5,))]),
    case("Gemm", [4, 3], {"transA": 1}, [("B", (4, 5)), ("C", (3, 5))], opset=9),
    case("MatMul", [2, 3, 4], {}, [("B", (4, 5))]),
    case("LRN", [1, 6, 4, 4], {"size": 3, "alpha": 1e-2, "beta": 0.75, "bias": 2.0}),
    case("LRN", [1, 7, 4, 4], {"size": 5, "alpha": 1e-2, "beta": 0.5}),  # onnxruntime takes odd sizes only
    case("Dropout", [2, 3], {"ratio": 0.3}, opset=9),
    case("Identity", [2, 3]),
    case("Cast", [2, 3], {"to": TensorProto.DOUBLE}),
]


def _const(name, spec, rng):
    value = spec if isinstance(spec, np.ndarray) else rng.standard_normal(spec).astype(F32)
    return numpy_helper.from_array(value, name)


def build(op, x_shape, attrs, consts, opset, n_out, x2_shape, rng):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    names = ["x"]
    if x2_shape:
        inputs.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, x2_shape))
        names.append("x2")
    inits = []
    for c in consts:
        if c is None:
            names.append("")
        else:
            inits.append(_const(c[0], c[1], rng))
            names.append(c[0])
    outs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, names, outs, name=f"{op.lower()}_node", **attrs)
    out_type = TensorProto.DOUBLE if op == "Cast" else TensorProto.FLOAT
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info(o, out_type, None) for o in outs],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model)  # the checker wants output shapes


@pytest.mark.parametrize("op,x_shape,attrs,consts,opset,n_out,x2_shape,positive", CASES)
def test_op_matches_onnxruntime(op, x_shape, attrs, consts, opset, n_out, x2_shape, positive):
    rng = np.random.default_rng()
    model = load_model(build(op, x_shape, attrs, consts, opset, n_out, x2_shape, rng))
    feeds = [rng.standard_normal(x_shape).astype(F32)]
    if x2_shape:
        feeds.append(rng.standard_normal(x2_shape).astype(F32))
    if positive:
        feeds = [np.abs(f) + 0.1 for f in feeds]
    want = run_ort(model, *feeds)
    tg = lift(model).eval()
    with torch.no_grad():
        got = tg(*(torch.from_numpy(f) for f in feeds))
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert tuple(g.shape) == w.shape
        assert rel_err(g.numpy(), w) < 1e-5


def test_batchnorm_train_mode_updates_running_stats_onnx_convention():
    """ONNX momentum m: running = running * m + batch * (1 - m)."""
    rng = np.random.default_rng()
    model = load_model(build("BatchNormalization", [8, 3, 4, 4], {"momentum": 0.8},
                             [("s", (3,)), ("b", (3,)), ("m", (3,)), ("v", np.ones(3, F32))], 15, 1, None, rng))
    tg = lift(model).train()
    mean0 = tg.onnx_buffers()["m"].clone()
    x = torch.from_numpy(rng.standard_normal((8, 3, 4, 4)).astype(F32)) * 2 + 1
    y = tg(x)
    batch_mean = x.mean(dim=(0, 2, 3))
    torch.testing.assert_close(tg.onnx_buffers()["m"], mean0 * 0.8 + batch_mean * 0.2)
    # train-mode output is normalised with the batch statistics
    s, b = tg.onnx_parameters()["s"].detach(), tg.onnx_parameters()["b"].detach()
    norm = (x - batch_mean.reshape(1, 3, 1, 1)) / torch.sqrt(x.var(dim=(0, 2, 3), unbiased=False) + 1e-5).reshape(1, 3, 1, 1)
    torch.testing.assert_close(y.detach(), norm * s.reshape(1, 3, 1, 1) + b.reshape(1, 3, 1, 1), rtol=1e-4, atol=1e-4)
    assert set(tg.onnx_parameters()) == {"s", "b"} and set(tg.onnx_buffers()) == {"m", "v"}


@pytest.mark.parametrize("op,attrs,consts", [
    ("Clip", {}, [("lo", np.array(-0.2, F32)), ("hi", np.array(0.4, F32))]),
    ("Clip", {}, [None, ("hi", np.array(0.4, F32))]),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, []),
], ids=["clip", "clip-max-only", "hardsigmoid"])
def test_bounded_activations_pass_gradient_only_inside_their_bounds(op, attrs, consts):
    """The lifted Clip / HardSigmoid (hardtanh inside, for its fast backward) differentiate as torch.clamp does."""
    rng = np.random.default_rng()
    tg = lift(load_model(build(op, [4, 9], attrs, consts, 13, 1, None, rng))).train()
    x = torch.from_numpy(rng.standard_normal((4, 9)).astype(F32)).requires_grad_()
    upstream = torch.from_numpy(rng.standard_normal((4, 9)).astype(F32))
    (tg(x) * upstream).sum().backward()
    ref = x.detach().clone().requires_grad_()
    lo = float(consts[0][1]) if consts and consts[0] is not None else None
    hi = float(consts[1][1]) if len(consts) > 1 else None
    y = (torch.clamp(ref, lo, hi) if op == "Clip"
         else torch.clamp(ref * attrs["alpha"] + attrs["beta"], 0.0, 1.0))
    (y * upstream).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=0, atol=0)
