"""NaN and +-Inf through PatternConv's CPU kernel follow ONNX, on every tier this machine runs.

Randomised (a fresh seed each run, printed in every failure; CTPRUNE_TEST_SEED=<n> replays it): NaN, +Inf and -Inf
injected at random positions of X, of the compact weights W, of the bias B and of the residual Z (one element or Y's
shape), for every activation (none, Relu, Relu6, a narrow Clip). The reference is onnxruntime's dense graph on the same
numbers: Conv on the masked dense weight, Add Z, then Relu or Clip. Compared: the NaN mask, the +Inf and -Inf masks,
and the finite values (relative 1e-5). The kernel runs with CTPRUNE_POISON_OUTPUT=1 (unwritten outputs show as NaN).

What has to match is the dense product's: a NaN or +-Inf input is multiplied by the pruned taps' zeros too
(0 * Inf = NaN), so it makes NaN of every output whose window holds it, whatever the pattern; an Inf weight times a
padded zero is NaN; the clamp keeps NaN. The reference runs at onnxruntime's basic optimisation level: at the full
level onnxruntime rewrites Conv into its NCHWc layout, whose kernels skip the padded taps instead of multiplying by the
zeros, so there an Inf weight next to the border gives +-Inf where ONNX's Conv (and numpy, checked too) give NaN.
"""

from __future__ import annotations

import math
import os
import secrets

import numpy as np
import onnx
import onnxruntime as ort
import onnxruntime.capi.onnxruntime_pybind11_state as ort_state
import pytest
from onnx import TensorProto, helper, numpy_helper

from ctprune.lab.layer_model import pattern_conv_model, random_pattern_layer
from ctprune.ops.reference import pattern_conv_numpy

SEED = int(os.environ.get("CTPRUNE_TEST_SEED", secrets.randbits(32)))
ACTIVATIONS = [(-math.inf, math.inf), (0.0, math.inf), (0.0, 6.0), (-0.3, 0.4)]
TIERS = ["generic", "generic16", "avx2", "avx512"]
SPECIALS = np.array([np.nan, np.inf, -np.inf], np.float32)
CASES_PER_POINT = 6


@pytest.fixture(autouse=True)
def poisoned_output(monkeypatch):
    monkeypatch.setenv("CTPRUNE_POISON_OUTPUT", "1")
    monkeypatch.delenv("CTPRUNE_FORCE_ISA", raising=False)


def kernel_session(model, library, threads=1):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def dense_session(model):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # see the module docstring
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def dense_graph(weight, bias, x_shape, strides, pads, activation, z_shape) -> onnx.ModelProto:
    """Conv -> (Add Z) -> (Relu | Clip): onnxruntime's own ops, with true infinities as Clip's bounds."""
    inits = [numpy_helper.from_array(weight, "Wd")]
    conv_inputs = ["X", "Wd"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "B"))
        conv_inputs.append("B")
    nodes = [helper.make_node("Conv", conv_inputs, ["conv"], kernel_shape=[3, 3], strides=list(strides),
                              pads=list(pads))]
    last = "conv"
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))]
    if z_shape is not None:
        inputs.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, list(z_shape)))
        nodes.append(helper.make_node("Add", [last, "Z"], ["summed"]))
        last = "summed"
    lo, hi = activation
    if lo == 0.0 and math.isinf(hi):
        nodes.append(helper.make_node("Relu", [last], ["Y"]))
    elif not (math.isinf(lo) and math.isinf(hi)):
        inits += [numpy_helper.from_array(np.array(lo, np.float32), "lo"),
                  numpy_helper.from_array(np.array(hi, np.float32), "hi")]
        nodes.append(helper.make_node("Clip", [last, "lo", "hi"], ["Y"]))
    else:
        nodes.append(helper.make_node("Identity", [last], ["Y"]))
    graph = helper.make_graph(nodes, "dense", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def inject(rng, array, count):
    """`count` NaN/+Inf/-Inf values at random positions of `array` (in place)."""
    if array is None or array.size == 0 or count == 0:
        return
    flat = array.reshape(-1)
    flat[rng.integers(0, flat.size, count)] = rng.choice(SPECIALS, count)


def assert_same(got, want, where, scale_of=None):
    """NaN, +Inf and -Inf masks equal; finite outputs within 1e-5 of the largest finite |want| (or of `scale_of`'s,
    e.g. the output before a narrow clamp, whose float32 rounding is the sum's, not the clamp's), at least 1."""
    assert got.shape == want.shape, where
    for name, mask in (("NaN", np.isnan), ("+Inf", np.isposinf), ("-Inf", np.isneginf)):
        differ = mask(got) != mask(want)
        assert not differ.any(), (f"{name} masks differ at {int(differ.sum())} of {got.size} outputs "
                                  f"(first at {np.argwhere(differ)[0].tolist()}: got {got[differ][0]}, "
                                  f"want {want[differ][0]}); {where}")
    finite = np.isfinite(want)
    ref = want if scale_of is None else scale_of
    scale = max(float(np.abs(ref[np.isfinite(ref)]).max(initial=0.0)), 1.0)
    error = float(np.abs(got[finite] - want[finite]).max(initial=0.0)) / scale
    assert error <= 1e-5, f"relative error {error:.2e} on finite outputs (scale {scale:.3g}); {where}"


def random_case(rng, activation):
    C, O = (int(v) for v in rng.integers(1, 13, 2))
    N = int(rng.integers(1, 3))
    stride = int(rng.integers(1, 3))
    pads = [int(v) for v in rng.integers(0, 3, 4)]
    H = int(rng.integers(max(1, 3 - pads[0] - pads[2]), 15))
    W = int(rng.integers(max(1, 3 - pads[1] - pads[3]), 15))
    layer = random_pattern_layer(rng, O, C, rng.integers(0, C + 1, O), library_size=int(rng.integers(1, 9)))
    bias = rng.standard_normal(O).astype(np.float32) if rng.random() < 0.7 else None
    oh, ow = (H + pads[0] + pads[2] - 3) // stride + 1, (W + pads[1] + pads[3] - 3) // stride + 1
    z_kind = rng.choice(["none", "one", "full"])
    z = None if z_kind == "none" else rng.standard_normal((1,) if z_kind == "one" else (N, O, oh, ow)).astype(
        np.float32)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    # Where the specials go: X almost always (sometimes a whole image), the others now and then.
    if rng.random() < 0.1:
        x[int(rng.integers(0, N))] = rng.choice(SPECIALS)
    else:
        inject(rng, x, int(rng.integers(1, 4)))
    if rng.random() < 0.3:
        inject(rng, layer.weights, 1)
    if rng.random() < 0.3:
        inject(rng, bias, 1)
    if rng.random() < 0.3:
        inject(rng, z, 1)
    dense = np.zeros((O, C, 9), np.float32)  # the masked dense weight, specials included
    for k in range(layer.kept_kernels):
        dense[layer.kernel_filters[k], layer.kernel_channels[k], layer.patterns[layer.kernel_patterns[k]]] = \
            layer.weights[k]
    layer.dense = dense.reshape(O, C, 3, 3)
    return dict(layer=layer, x=x, bias=bias, z=z, stride=stride, pads=pads, activation=activation,
                what=f"N={N} C={C} O={O} H={H} W={W} stride={stride} pads={pads} bias={bias is not None} "
                     f"Z={z_kind} activation={activation}")


def check(library, case, threads=1):
    layer, x, bias, z = case["layer"], case["x"], case["bias"], case["z"]
    strides = (case["stride"],) * 2
    model = pattern_conv_model(layer, x.shape, bias, strides, case["pads"], case["activation"],
                               z_shape=None if z is None else z.shape)
    feeds = {"X": x} if z is None else {"X": x, "Z": z}
    got = kernel_session(model, library, threads).run(None, feeds)[0]
    dense = dense_graph(layer.dense, bias, x.shape, strides, case["pads"], case["activation"],
                        None if z is None else z.shape)
    want = dense_session(dense).run(None, feeds)[0]
    where = f"seed {SEED}: {case['what']} isa={os.environ.get('CTPRUNE_FORCE_ISA')} threads={threads}"
    assert_same(got, want, where + " (vs onnxruntime)")
    with np.errstate(invalid="ignore", over="ignore"):
        numpy = pattern_conv_numpy(x, layer.weights, bias, layer.dense.shape, layer.patterns.ravel(),
                                   layer.kernel_filters, layer.kernel_channels, layer.kernel_patterns, strides,
                                   case["pads"], *case["activation"], Z=z).astype(np.float32)
    for name, mask in (("NaN", np.isnan), ("+Inf", np.isposinf), ("-Inf", np.isneginf)):
        assert (mask(got) == mask(numpy)).all(), f"{name} masks differ from numpy's float64 reference; {where}"


def tier_runs(tier, library, monkeypatch) -> bool:
    monkeypatch.setenv("CTPRUNE_FORCE_ISA", tier)
    layer = random_pattern_layer(np.random.default_rng(0), 1, 1, 1)
    try:
        kernel_session(pattern_conv_model(layer, (1, 1, 3, 3)), library)
        return True
    except (ort_state.Fail, ort_state.InvalidArgument, ort_state.RuntimeException) as err:
        assert "does not support" in str(err), str(err)
        return False


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=["none", "relu", "relu6", "clip"])
@pytest.mark.parametrize("tier", TIERS)
def test_nan_and_inf_follow_onnx(library, monkeypatch, tier, activation):
    if not tier_runs(tier, library, monkeypatch):
        pytest.skip(f"this CPU does not run the {tier} tier")
    rng = np.random.default_rng([SEED, TIERS.index(tier), ACTIVATIONS.index(activation)])
    for _ in range(CASES_PER_POINT):
        check(library, random_case(rng, activation))


def test_nan_and_inf_with_two_threads(library):
    rng = np.random.default_rng([SEED, 99])
    for activation in ACTIVATIONS:
        check(library, random_case(rng, activation), threads=2)


def test_the_clamp_keeps_nan(library):
    # Z = NaN everywhere, X finite: every output is NaN under every activation (a clamp with the operands the other
    # way round turns NaN into the bound).
    rng = np.random.default_rng([SEED, 7])
    layer = random_pattern_layer(rng, 5, 3, 2)
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    z = np.full((1, 5, 6, 6), np.nan, np.float32)
    for activation in ACTIVATIONS:
        model = pattern_conv_model(layer, x.shape, None, (1, 1), (1, 1, 1, 1), activation, z_shape=z.shape)
        y = kernel_session(model, library).run(None, {"X": x, "Z": z})[0]
        assert np.isnan(y).all(), f"activation {activation}: {int((~np.isnan(y)).sum())} outputs lost their NaN"


@pytest.mark.parametrize("tier", TIERS)
def test_stride_2_rows_of_every_width_report_an_inf_in_their_tail(library, monkeypatch, tier):
    """Stride 2 packs each row's pixels a vector of every other pixel at a time, the tail as masked vectors (16-lane
    tiers: every row under 32 pixels is all tail); an Inf in a row's last pixels must still be found, whatever the
    width around 1 and 2 vectors."""
    if not tier_runs(tier, library, monkeypatch):
        pytest.skip(f"this CPU does not run the {tier} tier")
    rng = np.random.default_rng([SEED, 11, TIERS.index(tier)])
    for W in (7, 15, 16, 17, 31, 32, 33, 47, 64):
        C, O, H = 3, 4, 6
        layer = random_pattern_layer(rng, O, C, np.full(O, C))  # every kernel kept: each input pixel is read
        dense = np.zeros((O, C, 9), np.float32)
        for k in range(layer.kept_kernels):
            dense[layer.kernel_filters[k], layer.kernel_channels[k], layer.patterns[layer.kernel_patterns[k]]] = \
                layer.weights[k]
        layer.dense = dense.reshape(O, C, 3, 3)
        x = rng.standard_normal((1, C, H, W)).astype(np.float32)
        x[0, int(rng.integers(0, C)), int(rng.integers(0, H)), W - 1 - int(rng.integers(0, 2))] = rng.choice(SPECIALS)
        check(library, dict(layer=layer, x=x, bias=None, z=None, stride=2, pads=[1, 1, 1, 1], activation=ACTIVATIONS[0],
                            what=f"stride 2, W={W}, a special in a row's last two pixels"))
