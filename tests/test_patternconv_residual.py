"""PatternConv's residual input Z (a fused Add: Y = clip(conv + B + Z)) on the CPU kernel, against the float64 numpy
reference and the model-local function (the form with Z) run by plain onnxruntime.

Fresh random cases each run (CTPRUNE_TEST_SEED=<n> replays one); outputs poisoned with NaN first
(CTPRUNE_POISON_OUTPUT=1) so unwritten elements show; Z of Y's full shape and of one element; bias on and off (off:
an empty B slot before Z); every activation; stride 1 and 2; batch 1 and 3; 1 and 2 threads; the portable and the
AVX2 tier. A Z of any other shape fails with an onnxruntime error.
"""

import math
import os
import secrets

import numpy as np
import pytest

from ctprune.lab.bench_layers import session
from ctprune.lab.layer_model import pattern_conv_model, random_pattern_layer
from ctprune.ops.reference import pattern_conv_function, pattern_conv_numpy

from test_patternconv_kernel import (  # noqa: F401
    ACTIVATIONS, ORT_ERRORS, TIERS, poisoned_output, tier_available)

SEED = int(os.environ.get("CTPRUNE_TEST_SEED", secrets.randbits(32)))


def _output_size(size, stride, pad):
    return (size + 2 * pad - 3) // stride + 1


def _case(rng):
    C, O = (int(v) for v in rng.choice([1, 3, 8, 16, 29, 64], 2))
    H, W = (int(v) for v in rng.integers(1, 40, 2))
    stride, pad = int(rng.integers(1, 3)), int(rng.integers(0, 2))
    if _output_size(H, stride, pad) < 1 or _output_size(W, stride, pad) < 1:
        H, W, pad = H + 3, W + 3, 1
    return dict(N=int(rng.choice([1, 3])), C=C, O=O, H=H, W=W, stride=stride, pad=pad, bias=bool(rng.integers(0, 2)),
                activation=ACTIVATIONS[int(rng.integers(0, len(ACTIVATIONS)))], full=bool(rng.integers(0, 4)),
                threads=int(rng.integers(1, 3)))


def check_residual_case(library, rng, c, where):
    layer = random_pattern_layer(rng, c["O"], c["C"], rng.integers(0, c["C"] + 1, c["O"]),
                                 library_size=int(rng.integers(1, 9)))
    x = rng.standard_normal((c["N"], c["C"], c["H"], c["W"])).astype(np.float32)
    b = rng.standard_normal(c["O"]).astype(np.float32) if c["bias"] else None
    y_shape = (c["N"], c["O"], _output_size(c["H"], c["stride"], c["pad"]), _output_size(c["W"], c["stride"], c["pad"]))
    z = rng.standard_normal(y_shape if c["full"] else (1,)).astype(np.float32) * 2
    model = pattern_conv_model(layer, x.shape, b, (c["stride"],) * 2, (c["pad"],) * 4, c["activation"], z_shape=z.shape)
    expected = pattern_conv_numpy(x, layer.weights, b, [c["O"], c["C"], 3, 3], layer.patterns.ravel(),
                                  layer.kernel_filters, layer.kernel_channels, layer.kernel_patterns,
                                  (c["stride"],) * 2, (c["pad"],) * 4, *c["activation"], Z=z)
    got = session(model, c["threads"], library).run(None, {"X": x, "Z": z})[0]
    model.functions.append(pattern_conv_function(17, residual=True))
    function = session(model, 1).run(None, {"X": x, "Z": z})[0]  # plain onnxruntime: the function
    assert got.shape == function.shape == y_shape, where
    assert not np.isnan(got).any(), "unwritten (NaN) outputs; " + where
    # The tolerance is relative to the sums before the clamp: a narrow clamp (-0.3, 0.4) leaves outputs far smaller
    # than the float32 rounding of the 4 * C-term sums that made them (seed 3487279557 case 7: 1.1e-5 at C = 64).
    unclamped = pattern_conv_numpy(x, layer.weights, b, [c["O"], c["C"], 3, 3], layer.patterns.ravel(),
                                   layer.kernel_filters, layer.kernel_channels, layer.kernel_patterns,
                                   (c["stride"],) * 2, (c["pad"],) * 4, -math.inf, math.inf, Z=z)
    scale = max(np.abs(unclamped).max(initial=0.0), 1.0)
    assert np.abs(got - expected).max(initial=0.0) / scale <= 1e-5, "kernel vs numpy; " + where
    assert np.abs(function - expected).max(initial=0.0) / scale <= 1e-5, "function vs numpy; " + where


@pytest.mark.parametrize("case", range(16))
def test_residual_matches_the_reference(library, case):
    rng = np.random.default_rng([SEED, case])
    c = _case(rng)
    check_residual_case(library, rng, c, f"seed {SEED} case {case}: {c}")


@pytest.mark.parametrize("tier", ["generic", "avx2"])
def test_residual_on_each_tier(library, tier, monkeypatch):
    if not tier_available(tier, library, monkeypatch):
        pytest.skip(f"this CPU does not run the {tier} tier")
    rng = np.random.default_rng([SEED, 99])
    for full in (True, False):
        c = dict(N=2, C=16, O=24, H=13, W=21, stride=1, pad=1, bias=True, activation=(0.0, 6.0), full=full, threads=2)
        check_residual_case(library, rng, c, f"seed {SEED} tier {tier}: {c}")


@pytest.mark.parametrize("tier", TIERS)
def test_rows_around_the_vector_width_on_each_tier(library, tier, monkeypatch):
    # A row's last vector store runs into the next row (which then overwrites it) unless it is the tile's last row:
    # output widths around one and two vectors, images tall enough for several tiles, a residual read the same way.
    if not tier_available(tier, library, monkeypatch):
        pytest.skip(f"this CPU does not run the {tier} tier")
    rng = np.random.default_rng([SEED, 98])
    for W in range(5, 20):
        for H, stride in ((7, 1), (31, 1), (30, 2)):
            c = dict(N=1, C=5, O=6, H=H, W=W, stride=stride, pad=1, bias=True, activation=(0.0, 6.0), full=True,
                     threads=2)
            check_residual_case(library, rng, c, f"seed {SEED} tier {tier}: {c}")


@pytest.mark.parametrize("z_shape", [(1, 4, 6, 7), (1, 4, 1, 1), (4,), (1, 4, 6, 6, 1), (2, 4, 6, 6)])
def test_a_residual_of_another_shape_fails_cleanly(library, z_shape):
    layer = random_pattern_layer(np.random.default_rng(0), 4, 3, 2)
    model = pattern_conv_model(layer, (1, 3, 6, 6), z_shape=z_shape)
    x = np.ones((1, 3, 6, 6), np.float32)
    with pytest.raises(ORT_ERRORS, match=r"Z \(the residual\) must have one element or Y's shape"):
        session(model, 1, library).run(None, {"X": x, "Z": np.ones(z_shape, np.float32)})


def test_no_residual_and_a_zero_residual_agree(library):
    rng = np.random.default_rng([SEED, 7])
    layer = random_pattern_layer(rng, 8, 8, 3)
    x = rng.standard_normal((1, 8, 9, 9)).astype(np.float32)
    plain = session(pattern_conv_model(layer, x.shape, activation=(0.0, math.inf)), 1, library).run(None, {"X": x})[0]
    zero = np.zeros((1,), np.float32)
    with_z = session(pattern_conv_model(layer, x.shape, activation=(0.0, math.inf), z_shape=(1,)), 1, library)
    assert np.array_equal(with_z.run(None, {"X": x, "Z": zero})[0], plain)
