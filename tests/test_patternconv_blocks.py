"""PatternConv's filter-block path (csrc/cpu/pattern_conv_tiles.inc, BlockStrip): runs of consecutive filters whose
kernel lists coincide (same channels, same patterns, same order) are computed 16 at a time.

Block-structured random layers (ctprune/lab/layer_model.py, random_pattern_layer(..., block=...)): runs of exactly 16
and 32 filters, 16+5 and 16+11 (the remainder per filter or as a padded block: CTPRUNE_PATTERN_BLOCK_PAD_MIN 1, the
default, 17), runs mixed with single and empty filters, O < 16, C = 1, at 2.25x/4x/8x; every tier this CPU runs and
the portable code at 8 and 16 lanes (CTPRUNE_FORCE_ISA); 1 and 2 threads; strides 1 and 2; asymmetric pads; bias; Z of
one element and of Y's shape; every activation; NaN and +-Inf in X; odd sizes (7x7, 1xW, widths not a multiple of 8).
Each case against onnxruntime's own Conv (+ Add Z, + Relu/Clip) on the masked dense weight (NaN, +Inf and -Inf masks
equal, finite outputs within 1e-5 of the output's scale) and against the model-local function run by plain
onnxruntime. Outputs are poisoned with NaN first (CTPRUNE_POISON_OUTPUT=1), so an element the kernel never writes
shows as a NaN the reference lacks. Fresh seeds each run (CTPRUNE_TEST_SEED=<n> replays one; it is in every message).
"""

import math
import os
import secrets

import numpy as np
import pytest
from onnx import TensorProto, helper

from ctprune.lab.layer_model import kept_per_filter_for_ratio, pattern_conv_model, random_pattern_layer
from ctprune.ops.reference import pattern_conv_function

from test_hardening_nan import assert_same, dense_graph, dense_session, inject, kernel_session
from test_patternconv_kernel import ACTIVATIONS, TIERS, tier_available

SEED = int(os.environ.get("CTPRUNE_TEST_SEED", secrets.randbits(32)))
RATIOS = [2.25, 4.0, 8.0]

# name -> (O, the builder's block argument, kept kernels per filter: None = one ratio for all, else a function of
# (rng, O, C) giving each output channel's count; a run takes its first member's count).
STRUCTURES = {
    "16": (16, 16, None),
    "32": (32, [32], None),
    "16+5": (21, [21], None),
    "16+11": (27, [27], None),
    "mixed": (48, [16, 21, 3], lambda rng, O, C: np.where(rng.random(O) < 0.15, 0, rng.integers(1, C + 1, O))),
    "O<16": (7, [7], None),
    "two runs, singles": (40, [16, 16], lambda rng, O, C: rng.integers(1, C + 1, O)),
}


@pytest.fixture(autouse=True)
def poisoned_output(monkeypatch):
    monkeypatch.setenv("CTPRUNE_POISON_OUTPUT", "1")
    for name in ("CTPRUNE_FORCE_ISA", "CTPRUNE_PATTERN_BLOCKS", "CTPRUNE_PATTERN_BLOCK_PAD_MIN",
                 "CTPRUNE_PATTERN_DIRECT"):
        monkeypatch.delenv(name, raising=False)


def block_layer(rng, structure, C, ratio):
    O, block, kept = STRUCTURES[structure]
    counts = kept_per_filter_for_ratio(C, ratio) if kept is None else kept(rng, O, C)
    return random_pattern_layer(rng, O, C, counts, library_size=int(rng.integers(1, 13)), block=block)


def output_size(size, pad_a, pad_b, stride):
    return (size + pad_a + pad_b - 3) // stride + 1


def random_geometry(rng):
    """Sizes around the block tiles (6 and 24 flat positions) and vectors: 7x7, one row, odd widths."""
    while True:
        H, W = [(7, 7), (1, int(rng.integers(3, 40))), (int(rng.integers(1, 20)), int(rng.integers(1, 40))),
                (int(rng.integers(2, 12)), int(rng.choice([9, 13, 17, 23, 29, 31, 33])))][int(rng.integers(0, 4))]
        pads = [int(v) for v in rng.integers(0, 3, 4)]
        stride = int(rng.integers(1, 3))
        if H + pads[0] + pads[2] >= 3 and W + pads[1] + pads[3] >= 3:
            return H, W, stride, pads


def check_block_case(library, rng, structure, *, C, ratio, threads, nonfinite, where=""):
    layer = block_layer(rng, structure, C, ratio)
    O = layer.dense.shape[0]
    H, W, stride, pads = random_geometry(rng)
    N = int(rng.choice([1, 2]))
    activation = ACTIVATIONS[int(rng.integers(0, len(ACTIVATIONS)))]
    bias = rng.standard_normal(O).astype(np.float32) if rng.random() < 0.7 else None
    oh, ow = output_size(H, pads[0], pads[2], stride), output_size(W, pads[1], pads[3], stride)
    z_kind = str(rng.choice(["none", "one", "full"]))
    z = None if z_kind == "none" else rng.standard_normal((1,) if z_kind == "one" else (N, O, oh, ow)).astype(
        np.float32)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    if nonfinite:
        inject(rng, x, int(rng.integers(1, 4)))
    strides = (stride, stride)
    what = (f"seed {SEED}: {where} {structure} C={C} O={O} ratio={ratio} N={N} H={H} W={W} stride={stride} "
            f"pads={pads} bias={bias is not None} Z={z_kind} activation={activation} threads={threads} "
            f"isa={os.environ.get('CTPRUNE_FORCE_ISA', 'auto')} "
            f"pad_min={os.environ.get('CTPRUNE_PATTERN_BLOCK_PAD_MIN', 'default')} nonfinite={nonfinite}")
    model = pattern_conv_model(layer, x.shape, bias, strides, pads, activation, z_shape=None if z is None else z.shape)
    feeds = {"X": x} if z is None else {"X": x, "Z": z}
    got = kernel_session(model, library, threads).run(None, feeds)[0]
    z_shape = None if z is None else z.shape
    dense = dense_graph(layer.dense, bias, x.shape, strides, pads, activation, z_shape)
    unclipped = dense_session(dense_graph(layer.dense, bias, x.shape, strides, pads, ACTIVATIONS[0], z_shape)).run(
        None, feeds)[0]
    assert_same_scaled(got, dense_session(dense).run(None, feeds)[0], unclipped, what + " (vs onnxruntime's Conv)")
    model.functions.append(pattern_conv_function(17, residual=z is not None))
    function = dense_session(model).run(None, feeds)[0]  # plain onnxruntime: the model-local function
    assert_same_scaled(got, function, unclipped, what + " (vs the function)")
    return got


def assert_same_scaled(got, want, unclipped, where):
    """test_hardening_nan's assert_same with the output's scale before the activation as the yardstick, as in
    test_patternconv_kernel: a narrow Clip leaves outputs of ~0.4 from sums of ~20 over hundreds of taps, whose
    float32 rounding (~3e-5 absolute against onnxruntime's Conv at C = 97, 2.25x, on the per-filter path and the
    block path alike) is not the clamp's."""
    assert_same(got, want, where, scale_of=unclipped)


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("tier", TIERS)
def test_block_layers_on_every_tier(library, monkeypatch, tier, structure):
    if not tier_available(tier, library, monkeypatch):
        pytest.skip(f"this CPU cannot run the {tier} tier")
    rng = np.random.default_rng([SEED, TIERS.index(tier), list(STRUCTURES).index(structure)])
    for i, (pad_min, ratio) in enumerate([(None, 2.25), (1, 4.0), (17, 8.0), (None, 8.0)]):
        if pad_min is None:
            monkeypatch.delenv("CTPRUNE_PATTERN_BLOCK_PAD_MIN", raising=False)
        else:
            monkeypatch.setenv("CTPRUNE_PATTERN_BLOCK_PAD_MIN", str(pad_min))
        C = int(rng.choice([1, 3, 16, 29, 40]))
        check_block_case(library, rng, structure, C=C, ratio=ratio, threads=1 + i % 2, nonfinite=i == 3,
                         where=f"case {i}")


@pytest.mark.parametrize("case", range(12))
def test_random_block_layers(library, monkeypatch, case):
    # Wider layers (more taps than one pass of 96, several strips) on the best tier, every structure and ratio.
    rng = np.random.default_rng([SEED, 100 + case])
    monkeypatch.setenv("CTPRUNE_PATTERN_BLOCK_PAD_MIN", str(int(rng.choice([1, 8, 17]))))
    structure = list(STRUCTURES)[case % len(STRUCTURES)]
    check_block_case(library, rng, structure, C=int(rng.choice([64, 97, 128])), ratio=RATIOS[case % 3],
                     threads=int(rng.integers(1, 3)), nonfinite=bool(case % 4 == 3), where=f"case {case}")


def test_large_image_many_strips(library, monkeypatch):
    # One block over a large image (many strips per image, the last one short) and a 7x7 layer of 32 blocks.
    for tier in ("generic16", "auto"):
        if tier == "auto":
            monkeypatch.delenv("CTPRUNE_FORCE_ISA", raising=False)
        else:
            monkeypatch.setenv("CTPRUNE_FORCE_ISA", tier)
        for O, C, H, W in ((16, 24, 61, 67), (512, 64, 7, 7)):
            rng = np.random.default_rng([SEED, 300, O])
            layer = random_pattern_layer(rng, O, C, kept_per_filter_for_ratio(C, 8.0), block=16)
            x = rng.standard_normal((1, C, H, W)).astype(np.float32)
            b = rng.standard_normal(O).astype(np.float32)
            model = pattern_conv_model(layer, x.shape, b, (1, 1), (1, 1, 1, 1), (0.0, math.inf))
            got = kernel_session(model, library, 2).run(None, {"X": x})[0]
            want = dense_session(dense_graph(layer.dense, b, x.shape, (1, 1), (1, 1, 1, 1), (0.0, math.inf),
                                             None)).run(None, {"X": x})[0]
            assert_same(got, want, f"seed {SEED}: tier {tier} O={O} C={C} {H}x{W}")


@pytest.mark.parametrize("blocks", [1, 2, 3, 4])
def test_threads_give_identical_results(library, blocks):
    # 1 to 4 blocks: the work is split over strips of pixels too, and each output is still summed in one order.
    rng = np.random.default_rng([SEED, 400 + blocks])
    O, C = 16 * blocks + 3, 48
    layer = random_pattern_layer(rng, O, C, rng.integers(1, C + 1, O), block=[16] * blocks)
    x = rng.standard_normal((2, C, 23, 29)).astype(np.float32)
    model = pattern_conv_model(layer, x.shape)
    one, two = (kernel_session(model, library, t).run(None, {"X": x})[0] for t in (1, 2))
    np.testing.assert_array_equal(one, two)
    want = dense_session(dense_graph(layer.dense, None, x.shape, (1, 1), (1, 1, 1, 1), ACTIVATIONS[0], None)).run(
        None, {"X": x})[0]
    assert_same(two, want, f"seed {SEED}: {blocks} blocks")


def test_the_block_path_runs(library, monkeypatch):
    # On a small image the per-filter path (CTPRUNE_PATTERN_BLOCKS=0) has small tiles and spreads consecutive kernels
    # over several sets of sums (pattern_conv_tiles.inc, SetsFor), while a block sums its taps in storage order, so on
    # a block-structured layer the two outputs differ in the last bits while both match the dense Conv: the blocks
    # were found and used. On a layer without runs both settings run the same code and agree exactly. (The direct form
    # sums in storage order too, and takes this layer when it has no blocks: it is switched off here.)
    monkeypatch.setenv("CTPRUNE_PATTERN_DIRECT", "0")
    rng = np.random.default_rng([SEED, 500])
    x = rng.standard_normal((1, 64, 5, 5)).astype(np.float32)
    runs = random_pattern_layer(rng, 32, 64, 40, block=16)
    singles = random_pattern_layer(rng, 32, 64, 40)
    out = {}
    for name, layer in (("runs", runs), ("singles", singles)):
        model = pattern_conv_model(layer, x.shape)
        for flag in ("0", "1"):
            monkeypatch.setenv("CTPRUNE_PATTERN_BLOCKS", flag)
            out[name, flag] = kernel_session(model, library, 1).run(None, {"X": x})[0]
        want = dense_session(dense_graph(layer.dense, None, x.shape, (1, 1), (1, 1, 1, 1), ACTIVATIONS[0],
                                         None)).run(None, {"X": x})[0]
        for flag in ("0", "1"):
            assert_same(out[name, flag], want, f"seed {SEED}: {name}, CTPRUNE_PATTERN_BLOCKS={flag}")
    assert not np.array_equal(out["runs", "0"], out["runs", "1"]), "the block path did not run"
    np.testing.assert_array_equal(out["singles", "0"], out["singles", "1"])


@pytest.mark.parametrize("tier", ["generic", "generic16", "avx2"])
def test_weights_as_a_graph_input(library, monkeypatch, tier):
    # W not a constant (an initializer that is also a graph input, so a feed replaces it): the blocks' weights are
    # regrouped on every call, from the weights fed.
    if not tier_available(tier, library, monkeypatch):
        pytest.skip(f"this CPU cannot run the {tier} tier")
    rng = np.random.default_rng([SEED, 600])
    layer = random_pattern_layer(rng, 27, 20, 9, block=[27])
    x = rng.standard_normal((2, 20, 9, 13)).astype(np.float32)
    model = pattern_conv_model(layer, x.shape)
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(layer.weights.shape)))
    sess = kernel_session(model, library, 2)
    for _ in range(2):
        w = rng.standard_normal(layer.weights.shape).astype(np.float32)
        dense = np.zeros_like(layer.dense).reshape(27, 20, 9)
        for k in range(layer.kept_kernels):
            dense[layer.kernel_filters[k], layer.kernel_channels[k], layer.patterns[layer.kernel_patterns[k]]] = w[k]
        got = sess.run(None, {"X": x, "W": w})[0]
        want = dense_session(dense_graph(dense.reshape(27, 20, 3, 3), None, x.shape, (1, 1), (1, 1, 1, 1),
                                         ACTIVATIONS[0], None)).run(None, {"X": x})[0]
        assert_same(got, want, f"seed {SEED}: tier {tier}, W fed")
