"""NaN and +-Inf through the PatternConv GPU kernel's own code (the CPU emulator, csrc/cuda/pattern_conv_emulate.cc)
follow ONNX, like the CPU kernel (tests/test_hardening_nan.py): NaN, +Inf and -Inf injected at random positions of
X, W, B and Z, every activation, every tile configuration and channel-split configuration; the NaN and +-Inf masks and
the finite values must equal numpy's float64 reference of the spec (ops/reference.py: the dense product, so a
non-finite input meets the pruned taps' zeros too). A fresh seed each run (CTPRUNE_TEST_SEED=<n> replays it)."""

import math
import os
import secrets
import shutil

import numpy as np
import pytest

from ctprune.lab.cuda_harness import KERNEL_CONFIGS, SPLIT_CONFIGS, EmulatedPatternConv, random_layer
from ctprune.ops.reference import pattern_conv_numpy

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")

SEED = int(os.environ.get("CTPRUNE_TEST_SEED", secrets.randbits(32)))
ACTIVATIONS = [(-math.inf, math.inf), (0.0, math.inf), (0.0, 6.0), (-0.3, 0.4)]
SPECIALS = np.array([np.nan, np.inf, -np.inf], np.float32)


@pytest.fixture(scope="module")
def emulator():
    return EmulatedPatternConv()


def inject(rng, array, count):
    if array is None or array.size == 0:
        return
    flat = array.reshape(-1)
    flat[rng.integers(0, flat.size, count)] = rng.choice(SPECIALS, count)


def numpy_reference(layer, x, z, clip=True):
    lo, hi = (layer.activation_min, layer.activation_max) if clip else (-np.inf, np.inf)
    with np.errstate(invalid="ignore", over="ignore"):
        return pattern_conv_numpy(x, layer.weights, layer.bias, layer.weight_shape, layer.patterns,
                                  layer.kernel_filters, layer.kernel_channels, layer.kernel_patterns, layer.strides,
                                  layer.pads, lo, hi, Z=z)


def assert_same(got, want, where, unclipped=None):
    """Masks of NaN/+Inf/-Inf equal; finite values within 1e-5 of the sums' scale: the float32 rounding of a sum is
    relative to the sum before any clip (a clipped output of 1 may come from a sum of 20), so `unclipped` sets it."""
    for name, mask in (("NaN", np.isnan), ("+Inf", np.isposinf), ("-Inf", np.isneginf)):
        differ = mask(got) != mask(want)
        assert not differ.any(), f"{name} masks differ at {int(differ.sum())} of {got.size} outputs; {where}"
    finite = np.isfinite(want)
    sums = want if unclipped is None else unclipped
    scale = max(float(np.abs(sums[np.isfinite(sums)]).max(initial=0.0)), 1.0)
    assert float(np.abs(got[finite] - want[finite]).max(initial=0.0)) / scale <= 1e-5, where


def random_case(rng, activation):
    n, c, o = int(rng.integers(1, 4)), int(rng.integers(1, 70)), int(rng.integers(1, 40))
    stride = int(rng.integers(1, 3))
    pads = tuple(int(v) for v in rng.integers(0, 3, 4))
    h = int(rng.integers(max(1, 3 - pads[0] - pads[2]), 12))
    w = int(rng.integers(max(1, 3 - pads[1] - pads[3]), 12))
    layer = random_layer(o, c, float(rng.choice([2.25, 4.0, 8.0])), rng, strides=(stride, stride), pads=pads,
                         activation=activation, bias=bool(rng.random() < 0.7), empty_filters=int(rng.integers(0, 3)))
    oh, ow = layer.output_size(h, w)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    z_kind = rng.choice(["none", "one", "full"])
    z = None if z_kind == "none" else rng.standard_normal((1,) if z_kind == "one" else (n, o, oh, ow)).astype(np.float32)
    inject(rng, x, int(rng.integers(1, 4)))
    if rng.random() < 0.3:
        inject(rng, layer.weights, 1)
    if rng.random() < 0.3:
        inject(rng, layer.bias, 1)
    if rng.random() < 0.3:
        inject(rng, z, 1)
    return layer, x, z, f"seed {SEED}: N={n} C={c} O={o} H={h} W={w} stride={stride} pads={pads} Z={z_kind}"


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=["none", "relu", "relu6", "clip"])
@pytest.mark.parametrize("config", (0,) + KERNEL_CONFIGS + SPLIT_CONFIGS)
def test_nan_and_inf_follow_onnx(emulator, config, activation):
    rng = np.random.default_rng([SEED, config, ACTIVATIONS.index(activation)])
    for _ in range(3):
        layer, x, z, where = random_case(rng, activation)
        got, plan = emulator(layer, x, z, force_config=config)
        assert_same(got, numpy_reference(layer, x, z), f"{where}, config {config}, plan {plan}",
                    unclipped=numpy_reference(layer, x, z, clip=False))


def test_a_whole_nan_image(emulator):
    rng = np.random.default_rng([SEED, 1])
    layer = random_layer(24, 40, 8.0, rng, activation=(0.0, 6.0))
    x = rng.standard_normal((2, 40, 9, 9)).astype(np.float32)
    x[1] = np.nan
    got, _ = emulator(layer, x, force_config=411)
    assert np.isnan(got[1]).all() and not np.isnan(got[0]).any()
