"""The SparseConv GPU kernels' own code, run on the CPU (csrc/cuda/sparse_conv_emulate.cc), against numpy's float64
SparseConv on the masked dense weight (ops/sparse_reference.py).

Randomised like the PatternConv emulator tests (a fresh seed each run, CTPRUNE_TEST_SEED=<n> replays it): Conv layers
of every kernel size 1..5, strides, pads, dilations and groups, and FC layers, at blocks 1, 2, 4 and 8 (partial last
blocks and empty blocks included), every activation (none, Relu, Clip, HardSwish, SiLU), with and without bias and a
residual Z (one element or Y's shape). The emulator frames every buffer with NaN guard zones: a read outside an input
shows as NaN in the output (checked: no NaN where the reference has none), a write outside the output fails the call.
NaN and +-Inf injected into X, W, B and Z must give the reference's NaN and +-Inf masks.
"""

import math
import os
import secrets
import shutil

import numpy as np
import pytest

from ctprune.lab.cuda_harness import KernelCallError
from ctprune.lab.cuda_sparse_harness import EmulatedSparseConv, random_sparse_layer, reference

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")

SEED = int(os.environ.get("CTPRUNE_TEST_SEED", secrets.randbits(32)))
BLOCKS = [1, 2, 4, 8]
ACTIVATIONS = {"none": ((-math.inf, math.inf), 0), "relu": ((0.0, math.inf), 0), "clip": ((-0.3, 0.4), 0),
               "hardswish": ((-math.inf, math.inf), 1), "silu": ((-math.inf, math.inf), 2),
               "relu6-silu": ((0.0, 6.0), 2)}
SPECIALS = np.array([np.nan, np.inf, -np.inf], np.float32)


@pytest.fixture(scope="module")
def emulator():
    return EmulatedSparseConv()


def random_conv(rng, block, activation):
    (lo, hi), gate = ACTIVATIONS[activation]
    group = int(rng.choice([1, 1, 2, 3]))
    og = int(rng.integers(1, 7))
    cg = int(rng.integers(1, 6))
    kh, kw = (int(v) for v in rng.choice([1, 2, 3, 5], 2))
    strides = tuple(int(v) for v in rng.integers(1, 3, 2))
    dilations = tuple(int(v) for v in rng.integers(1, 3, 2))
    pads = tuple(int(v) for v in rng.integers(0, 3, 4))
    span_h, span_w = dilations[0] * (kh - 1) + 1, dilations[1] * (kw - 1) + 1
    h = int(rng.integers(max(1, span_h - pads[0] - pads[2]), span_h + 8))
    w = int(rng.integers(max(1, span_w - pads[1] - pads[3]), span_w + 8))
    layer = random_sparse_layer(rng, (og * group, cg, kh, kw), float(rng.choice([1.0, 2.0, 4.0, 8.0])), block,
                                group=group, bias=bool(rng.random() < 0.7), strides=strides, pads=pads,
                                dilations=dilations, activation=(lo, hi), gate=gate,
                                empty_blocks=int(rng.integers(0, 2)))
    n = int(rng.integers(1, 4))
    x = rng.standard_normal((n, cg * group, h, w)).astype(np.float32)
    where = (f"seed {SEED}: Conv O={og * group} Cg={cg} k={kh}x{kw} group={group} block={block} stride={strides} "
             f"pads={pads} dilations={dilations} N={n} H={h} W={w} activation={activation}")
    return layer, x, where


def random_fc(rng, block, activation):
    (lo, hi), gate = ACTIVATIONS[activation]
    o, i = int(rng.integers(1, 40)), int(rng.integers(1, 300))
    layer = random_sparse_layer(rng, (o, i), float(rng.choice([1.0, 2.0, 4.0, 16.0])), block,
                                bias=bool(rng.random() < 0.7), activation=(lo, hi), gate=gate,
                                empty_blocks=int(rng.integers(0, 2)))
    n = int(rng.integers(1, 5))
    x = rng.standard_normal((n, i)).astype(np.float32)
    return layer, x, f"seed {SEED}: FC O={o} I={i} block={block} N={n} activation={activation}"


def residual(rng, layer, x):
    kind = rng.choice(["none", "one", "full"])
    if kind == "none":
        return None
    o = int(layer.compact.weight_shape[0])
    if layer.fc:
        shape = (x.shape[0], o)
    else:
        shape = (x.shape[0], o) + layer.output_size(x.shape[2], x.shape[3])
    return rng.standard_normal((1,) if kind == "one" else shape).astype(np.float32)


def assert_same(got, want, where):
    assert got.shape == want.shape, where
    for name, mask in (("NaN", np.isnan), ("+Inf", np.isposinf), ("-Inf", np.isneginf)):
        differ = mask(got) != mask(want)
        assert not differ.any(), f"{name} masks differ at {int(differ.sum())} of {got.size} outputs; {where}"
    finite = np.isfinite(want)
    scale = max(float(np.abs(want[finite]).max(initial=0.0)), 1.0)
    error = float(np.abs(got[finite].astype(np.float64) - want[finite]).max(initial=0.0)) / scale
    assert error <= 1e-5, f"relative error {error:.2e}; {where}"


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("kind", ["conv", "fc"])
def test_random_layers(emulator, kind, block, activation):
    rng = np.random.default_rng([SEED, BLOCKS.index(block), list(ACTIVATIONS).index(activation), kind == "fc"])
    for _ in range(4):
        layer, x, where = (random_conv if kind == "conv" else random_fc)(rng, block, activation)
        z = residual(rng, layer, x)
        assert_same(emulator(layer, x, z), reference(layer, x, z), where + f" Z={None if z is None else z.shape}")


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("kind", ["conv", "fc"])
def test_nan_and_inf_follow_onnx(emulator, kind, block):
    rng = np.random.default_rng([SEED, 77, block, kind == "fc"])
    for activation in ACTIVATIONS:
        layer, x, where = (random_conv if kind == "conv" else random_fc)(rng, block, activation)
        z = residual(rng, layer, x)
        w = layer.weights.copy()
        x.reshape(-1)[rng.integers(0, x.size, int(rng.integers(1, 4)))] = rng.choice(SPECIALS, 1)
        if rng.random() < 0.3 and w.size:
            w.reshape(-1)[rng.integers(0, w.size)] = rng.choice(SPECIALS)
        if rng.random() < 0.3 and layer.bias is not None:
            layer.bias[rng.integers(0, layer.bias.size)] = rng.choice(SPECIALS)
        if rng.random() < 0.3 and z is not None:
            z.reshape(-1)[rng.integers(0, z.size)] = rng.choice(SPECIALS)
        assert_same(emulator(layer, x, z, w=w), reference(layer, x, z, w=w), where + " (non-finite values)")


def test_benchmark_shapes(emulator):
    # A MobileNetV2 1x1 layer and a (small) FC at the benchmark's ratios and blocks.
    rng = np.random.default_rng([SEED, 5])
    for weight_shape, x_shape, block in [((96, 24, 1, 1), (1, 24, 14, 14), 4), ((64, 512), (2, 512), 8)]:
        layer = random_sparse_layer(rng, weight_shape, 8.0, block)
        x = rng.standard_normal(x_shape).astype(np.float32)
        assert_same(emulator(layer, x), reference(layer, x), f"seed {SEED}: {weight_shape}")


def test_invalid_layers_are_named(emulator):
    rng = np.random.default_rng([SEED, 9])
    layer = random_sparse_layer(rng, (8, 4, 3, 3), 2.0, 4)
    x = rng.standard_normal((1, 4, 5, 5)).astype(np.float32)
    layer.compact = type(layer.compact)(**{**layer.compact.__dict__, "columns": layer.compact.columns[::-1].copy()})
    with pytest.raises(KernelCallError, match="strictly increasing|outside the column space"):
        emulator(layer, x)
    layer = random_sparse_layer(rng, (8, 4, 3, 3), 2.0, 4)
    layer.compact = type(layer.compact)(**{**layer.compact.__dict__,
                                           "block_order": np.zeros_like(layer.compact.block_order)})
    with pytest.raises(KernelCallError, match="block_order"):
        emulator(layer, x)
    layer = random_sparse_layer(rng, (8, 4, 3, 3), 2.0, 4)
    with pytest.raises(KernelCallError, match="status -2"):  # X with the wrong channel count
        emulator(layer, rng.standard_normal((1, 5, 5, 5)).astype(np.float32))
    with pytest.raises(KernelCallError, match="status -2"):  # a Z of neither size
        emulator(layer, x, np.zeros(7, np.float32))
