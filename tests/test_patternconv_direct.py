"""PatternConv's direct form (csrc/cpu/pattern_conv_tiles.inc, DirectTiles): stride 1 with every pad 1 and few kept
multiply-adds (pattern_conv_plan.h, kDirectMaxMacs and kDirectMacsPerValue) reads X in place through lane masks at the
borders and writes Y's rows directly, instead of packing a zero-padded copy.

On each tier that has it (AVX2, AVX-512) and on the tier chosen from the CPU (on AVX-512, 7x7 planes run in 8-float
vectors with mask registers): widths around 1, 2, 3 and 4 vectors of either tier (the row's first and last vector both
masked, rows whose last vector holds one output), heights 1-3 and heights that split into tiles whose last one
overlaps the one before; bias, Z of Y's shape, every activation, 1 and 2 threads, batch 1 and 3; NaN and +-Inf in X
(the scan that replaces the packing's report); infinite weights, constant or fed (the form skips the taps that would
read the pad, which add 0 * w: the op packs instead then); the form forced past its rule (CTPRUNE_PATTERN_DIRECT=2).
Each case against onnxruntime's own Conv (+ Add Z, + Clip) on the masked dense weight, and against the packed form
(CTPRUNE_PATTERN_DIRECT=0) of the same library. Outputs are poisoned with NaN first, so an element the kernel never
writes shows. Fresh seeds each run (CTPRUNE_TEST_SEED=<n> replays one; it is in every message).
"""

import itertools
import os
import secrets

import numpy as np
import pytest
from onnx import TensorProto, helper

from ctprune.lab.layer_model import pattern_conv_model, random_pattern_layer

from test_hardening_nan import assert_same, dense_graph, dense_session, inject, kernel_session
from test_patternconv_kernel import ACTIVATIONS, tier_available

SEED = int(os.environ.get("CTPRUNE_TEST_SEED", secrets.randbits(32)))
WIDTHS = (1, 2, 3, 5, 7, 8, 9, 14, 15, 16, 17, 23, 24, 25, 28, 31, 32, 33, 40, 47, 48, 49, 56, 63, 64, 65)
HEIGHTS = (1, 2, 3, 7, 13, 28, 37)


@pytest.fixture(autouse=True)
def poisoned_output(monkeypatch):
    monkeypatch.setenv("CTPRUNE_POISON_OUTPUT", "1")
    for name in ("CTPRUNE_FORCE_ISA", "CTPRUNE_PATTERN_DIRECT"):
        monkeypatch.delenv(name, raising=False)


def check_direct(library, monkeypatch, rng, *, N, C, O, H, W, activation, threads, residual, specials, what,
                 forced=False):
    layer = random_pattern_layer(rng, O, C, rng.integers(0, C + 1, O), library_size=int(rng.integers(1, 13)))
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    inject(rng, x, specials)
    b = rng.standard_normal(O).astype(np.float32)
    z = rng.standard_normal((N, O, H, W)).astype(np.float32) if residual else None
    feeds = {"X": x} if z is None else {"X": x, "Z": z}
    z_shape = None if z is None else z.shape
    want = dense_session(dense_graph(layer.dense, b, x.shape, (1, 1), (1, 1, 1, 1), activation, z_shape))
    want = want.run(None, feeds)[0]
    model = pattern_conv_model(layer, x.shape, b, (1, 1), (1, 1, 1, 1), activation, z_shape=z_shape)
    on = "2" if forced else "1"  # 2: the direct form wherever it can run, past the rule of when it pays
    got = {}
    for direct in (on, "0"):
        monkeypatch.setenv("CTPRUNE_PATTERN_DIRECT", direct)
        got[direct] = kernel_session(model, library, threads).run(None, feeds)[0]
    where = (f"seed {SEED}: {what} N={N} C={C} O={O} H={H} W={W} activation={activation} threads={threads} "
             f"residual={residual} specials={specials} isa={os.environ.get('CTPRUNE_FORCE_ISA', 'auto')}")
    assert_same(got[on], want, "direct form vs onnxruntime; " + where)
    assert_same(got[on], got["0"], "direct vs packed form; " + where)


@pytest.mark.parametrize("tier", ["avx2", "avx512", None])
def test_widths_and_heights_on_each_tier(library, tier, monkeypatch):
    if tier is not None and not tier_available(tier, library, monkeypatch):
        pytest.skip(f"this CPU cannot run the {tier} tier")
    rng = np.random.default_rng([SEED, 100 + (2 if tier is None else ["avx2", "avx512"].index(tier))])
    for W, H in itertools.product(WIDTHS, HEIGHTS):
        if rng.random() > 0.35 and W not in (1, 7, 14, 28):  # a third of the grid each run, the usual sizes always
            continue
        check_direct(library, monkeypatch, rng, N=int(rng.choice([1, 3])), C=int(rng.integers(1, 9)),
                     O=int(rng.integers(1, 9)), H=H, W=W, activation=ACTIVATIONS[int(rng.integers(0, 4))],
                     threads=int(rng.integers(1, 3)), residual=bool(rng.integers(0, 2)), specials=0,
                     what="grid")


@pytest.mark.parametrize("tier", ["avx2", "avx512", None])
def test_non_finite_inputs_on_each_tier(library, tier, monkeypatch):
    if tier is not None and not tier_available(tier, library, monkeypatch):
        pytest.skip(f"this CPU cannot run the {tier} tier")
    rng = np.random.default_rng([SEED, 200 + (2 if tier is None else ["avx2", "avx512"].index(tier))])
    for W, specials in itertools.product((7, 14, 28), (1, 4)):
        check_direct(library, monkeypatch, rng, N=2, C=int(rng.integers(2, 12)), O=int(rng.integers(1, 12)),
                     H=int(rng.integers(1, 20)), W=W, activation=ACTIVATIONS[int(rng.integers(0, 4))],
                     threads=int(rng.integers(1, 3)), residual=bool(rng.integers(0, 2)), specials=specials,
                     what="non-finite X")


def test_resnet_sized_layers_take_the_direct_form(library, monkeypatch):
    # The layer sizes the direct form is for (ResNet-20 on 28x28 inputs at 8x: 16@28, 32@14, 64@7): the two forms
    # agree on them, and a large layer (beyond kDirectMaxMacs) is the same with the switch on or off; then the form
    # forced (CTPRUNE_PATTERN_DIRECT=2) on a layer the rule leaves packed, rows of 4 vectors on AVX-512.
    rng = np.random.default_rng([SEED, 300])
    for C, HW, kept in ((16, 28, 4), (32, 14, 9), (64, 7, 18), (64, 28, 40)):
        check_direct(library, monkeypatch, rng, N=1, C=C, O=C, H=HW, W=HW, activation=ACTIVATIONS[1], threads=1,
                     residual=True, specials=0, what=f"{C}@{HW}")
    check_direct(library, monkeypatch, rng, N=2, C=40, O=24, H=30, W=56, activation=ACTIVATIONS[2], threads=2,
                 residual=True, specials=2, what="forced", forced=True)


def _dense_of(layer, weights):
    O, C = layer.dense.shape[:2]
    dense = np.zeros((O, C, 9), np.float32)
    for k in range(layer.kept_kernels):
        dense[layer.kernel_filters[k], layer.kernel_channels[k], layer.patterns[layer.kernel_patterns[k]]] = weights[k]
    return dense.reshape(O, C, 3, 3)


@pytest.mark.parametrize("fed", [False, True])
def test_infinite_weights_make_the_border_nan_as_the_pad_does(library, monkeypatch, fed):
    # An infinite weight on a tap that reads the zero pad makes those outputs NaN in a dense Conv (0 * Inf): with W a
    # constant the kernel sees it once, fed as a graph input on every call; finite weights fed take the direct form.
    # Fed, one session runs infinite, finite, infinite and finite weights in turn on one input size: the two forms'
    # tap offsets differ and must not be taken for each other's.
    rng = np.random.default_rng([SEED, 400 + fed])
    layer = random_pattern_layer(rng, 6, 5, 5)
    x = rng.standard_normal((1, 5, 9, 14)).astype(np.float32)
    model = pattern_conv_model(layer, x.shape)
    if fed:
        model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(layer.weights.shape)))
        fed_session = kernel_session(model, library, 1)
    for infinite in (True, False, True, False) if fed else (True,):
        w = layer.weights.copy() if not fed else rng.standard_normal(layer.weights.shape).astype(np.float32)
        if infinite:
            w[rng.integers(0, len(w), 2), rng.integers(0, 4, 2)] = [np.inf, -np.inf]
        if not fed:
            model.graph.initializer[0].CopyFrom(helper.make_tensor("W", TensorProto.FLOAT, w.shape, w.ravel()))
        feeds = {"X": x, "W": w} if fed else {"X": x}
        want = dense_session(dense_graph(_dense_of(layer, w), None, x.shape, (1, 1), (1, 1, 1, 1), ACTIVATIONS[0],
                                         None)).run(None, {"X": x})[0]
        assert np.isnan(want).any() == infinite  # the pad's 0 * Inf is there to get right
        got = (fed_session if fed else kernel_session(model, library, 1)).run(None, feeds)[0]
        assert_same(got, want, f"seed {SEED}: fed={fed} infinite={infinite}")
