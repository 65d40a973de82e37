"""ctprune's PatternConv CPU kernel (csrc/) against onnxruntime's own Conv on the masked dense weights.

Randomised (a fresh seed each run, printed in every failure; CTPRUNE_TEST_SEED=<n> replays it) over batch, channels,
sizes, stride, pads, bias, fused activation, empty filters, every library pattern, 1 and 2 threads and every ISA tier
(CTPRUNE_FORCE_ISA, read when a session creates the kernel). The kernel runs with CTPRUNE_POISON_OUTPUT=1, which fills
its output with NaN first, so any element it fails to write shows. Malformed nodes must fail with an onnxruntime
error, not a crash.
"""

import itertools
import math
import os
import secrets

import numpy as np
import onnxruntime as ort
import onnxruntime.capi.onnxruntime_pybind11_state as ort_state
import pytest
from onnx import helper

from ctprune.lab.bench_layers import session
from ctprune.lab.layer_model import dense_conv_model, pattern_conv_model, random_pattern_layer
from ctprune.ops import pattern_layout

ORT_ERRORS = (ort_state.Fail, ort_state.InvalidArgument, ort_state.InvalidGraph, ort_state.RuntimeException,
              ort_state.NotImplemented)
SEED = int(os.environ.get("CTPRUNE_TEST_SEED", secrets.randbits(32)))
ACTIVATIONS = [(-math.inf, math.inf), (0.0, math.inf), (0.0, 6.0), (-0.3, 0.4)]
TIERS = ["generic", "generic16", "avx2", "avx512"]
MAX_MACS = 3e7  # dense multiply-adds per random case: keeps each case to milliseconds


@pytest.fixture(autouse=True)
def poisoned_output(monkeypatch):
    monkeypatch.setenv("CTPRUNE_POISON_OUTPUT", "1")
    monkeypatch.delenv("CTPRUNE_FORCE_ISA", raising=False)


def tier_available(tier, library, monkeypatch) -> bool:
    """Whether this CPU runs `tier` (the kernel refuses a forced tier the CPU lacks, with an onnxruntime error)."""
    monkeypatch.setenv("CTPRUNE_FORCE_ISA", tier)
    layer = random_pattern_layer(np.random.default_rng(0), 1, 1, 1)
    try:
        session(pattern_conv_model(layer, (1, 1, 3, 3)), 1, library)
        return True
    except ORT_ERRORS as err:
        assert "does not support" in str(err), str(err)
        return False


def check_case(library, rng, *, N, C, O, H, W, stride, pads, bias, activation, threads, kept=None, what=""):
    kept = rng.integers(0, C + 1, O) if kept is None else kept
    layer = random_pattern_layer(rng, O, C, kept, library_size=int(rng.integers(1, 13)))
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32) if bias else None
    args = (x.shape, b, (stride, stride), pads)
    expected = session(dense_conv_model(layer, *args, activation), 1).run(None, {"X": x})[0]
    scale = np.abs(session(dense_conv_model(layer, *args), 1).run(None, {"X": x})[0]).max(initial=1e-30)
    got = session(pattern_conv_model(layer, *args, activation), threads, library).run(None, {"X": x})[0]
    where = (f"seed {SEED}: {what} N={N} C={C} O={O} H={H} W={W} stride={stride} pads={pads} bias={bias} "
             f"activation={activation} threads={threads} isa={os.environ.get('CTPRUNE_FORCE_ISA', 'auto')}")
    assert got.shape == expected.shape, where
    assert not np.isnan(got).any(), "unwritten (NaN) outputs; " + where
    error = np.abs(got - expected).max(initial=0.0) / scale
    assert error <= 1e-5, f"relative error {error:.2e}; " + where


def random_case(rng):
    """One point of the matrix, its size capped so that the dense reference stays fast."""
    while True:
        C, O = (int(v) for v in rng.choice([1, 2, 3, 5, 8, 13, 16, 31, 64, 97, 128, 256, 512], 2))
        H, W = (int(v) for v in rng.integers(1, 65, 2))
        N = int(rng.choice([1, 3, 8]))
        stride = int(rng.integers(1, 3))
        pads = [int(v) for v in rng.integers(0, 2, 4)]
        if H + pads[0] + pads[2] < 3 or W + pads[1] + pads[3] < 3:
            continue
        if N * C * O * 9 * H * W / stride**2 <= MAX_MACS:
            return dict(N=N, C=C, O=O, H=H, W=W, stride=stride, pads=pads, bias=bool(rng.integers(0, 2)),
                        activation=ACTIVATIONS[int(rng.integers(0, len(ACTIVATIONS)))], threads=int(rng.integers(1, 3)))


@pytest.mark.parametrize("case", range(24))
def test_random_cases_match_dense_conv(library, case):
    rng = np.random.default_rng([SEED, case])
    check_case(library, rng, **random_case(rng), what=f"case {case}")


@pytest.mark.parametrize("tier", TIERS)
def test_every_isa_tier(library, tier, monkeypatch):
    if not tier_available(tier, library, monkeypatch):
        pytest.skip(f"this CPU cannot run the {tier} tier")
    rng = np.random.default_rng([SEED, 1000 + TIERS.index(tier)])
    # Widths around the vector sizes (tails), both strides, odd channel counts, and one random point.
    for W in (1, 4, 7, 8, 9, 15, 16, 17, 33):
        check_case(library, rng, N=int(rng.choice([1, 3])), C=int(rng.integers(1, 20)), O=int(rng.integers(1, 20)),
                   H=int(rng.integers(3, 20)), W=W + 2, stride=int(rng.integers(1, 3)), pads=[1, 1, 1, 1],
                   bias=True, activation=ACTIVATIONS[int(rng.integers(0, 4))], threads=2, what=f"width {W + 2}")
    check_case(library, rng, **random_case(rng), what="random")


def test_narrow_planes_on_the_chosen_tier(library):
    # The tier chosen from the CPU (no CTPRUNE_FORCE_ISA) runs output planes whose flat row is at most 8 floats with
    # the 8-float kernels where it has wider ones (dispatch.h, NarrowPlaneKernels: on AVX-512, the AVX2 tier's): flat
    # rows 7-9 at stride 1 (widths 6-8 with one-pixel pads) and stride 2 (outputs 6-8 wide), around that boundary.
    rng = np.random.default_rng([SEED, 1500])
    for W, stride in itertools.product((6, 7, 8), (1, 2)):
        width = W if stride == 1 else 2 * W
        check_case(library, rng, N=int(rng.choice([1, 2])), C=int(rng.integers(1, 70)), O=int(rng.integers(1, 70)),
                   H=int(rng.integers(3, 16)) * stride, W=width, stride=stride, pads=[1, 1, 1, 1], bias=True,
                   activation=ACTIVATIONS[int(rng.integers(0, 4))], threads=int(rng.integers(1, 3)),
                   what=f"narrow plane {W} wide")


def test_edges(library):
    rng = np.random.default_rng([SEED, 2000])
    base = dict(N=1, bias=True, activation=ACTIVATIONS[1], threads=2)
    # Every kernel of every filter removed: the output is bias then activation.
    check_case(library, rng, C=5, O=7, H=6, W=6, stride=1, pads=[1, 1, 1, 1], kept=np.zeros(7, np.int64),
               what="all removed", **base)
    # 1x1 input with pads, 3x3 input without pads, asymmetric pads, wide and tall, batch 8.
    check_case(library, rng, C=3, O=4, H=1, W=1, stride=1, pads=[1, 1, 1, 1], what="1x1", **base)
    check_case(library, rng, C=3, O=4, H=3, W=3, stride=2, pads=[0, 0, 0, 0], what="3x3 valid", **base)
    check_case(library, rng, C=9, O=6, H=10, W=13, stride=2, pads=[0, 1, 1, 0], what="asymmetric", **base)
    check_case(library, rng, C=4, O=3, H=2, W=64, stride=1, pads=[1, 1, 1, 1], what="wide", **base)
    check_case(library, rng, C=4, O=3, H=64, W=3, stride=1, pads=[1, 0, 1, 0], what="tall", **dict(base, N=8))
    # Large channel counts with few pixels (where filter-parallel threading matters).
    check_case(library, rng, C=512, O=512, H=4, W=4, stride=1, pads=[1, 1, 1, 1], what="512x4", **base)
    # A large image: many flat tiles, cut into several tile blocks (work items) whose input fits L2.
    check_case(library, rng, C=96, O=6, H=90, W=97, stride=1, pads=[1, 1, 1, 1], what="tile blocks", **base)
    # Pads wider than one pixel, both strides (phase planes for stride 2).
    check_case(library, rng, C=5, O=4, H=11, W=12, stride=2, pads=[2, 3, 2, 1], what="pads 2-3, stride 2", **base)
    check_case(library, rng, C=5, O=4, H=9, W=10, stride=1, pads=[3, 2, 0, 2], what="pads 0-3, stride 1", **base)


@pytest.mark.parametrize("tier", TIERS)
def test_every_small_geometry(library, tier, monkeypatch):
    # Widths 1-6 and 9 against every left/right pad 0-3 (the packing shares a row's right pad with the next row's left
    # pad at stride 1, and splits columns into two phases at stride 2: the corners of both are here), heights 1 and 4.
    # On each tier: each packs with its own vectors, copying rows narrower than a vector a vector at a time while the
    # read stays inside the image (the last rows in scalars), a 9-wide row as a vector plus an overlapping tail.
    if not tier_available(tier, library, monkeypatch):
        pytest.skip(f"this CPU cannot run the {tier} tier")
    rng = np.random.default_rng([SEED, 2500 + TIERS.index(tier)])
    for W, H, left, right, top, bottom, stride in itertools.product((1, 2, 3, 4, 5, 6, 9), (1, 4), range(4), range(4),
                                                                     (0, 2), (0, 2), (1, 2)):
        if W + left + right >= 3 and H + top + bottom >= 3:
            check_case(library, rng, N=1, C=2, O=3, H=H, W=W, stride=stride, pads=[top, left, bottom, right],
                       bias=False, activation=ACTIVATIONS[0], threads=1, kept=np.full(3, 2), what="small geometry")


@pytest.mark.parametrize("tier", TIERS)
def test_narrow_stride_two_rows_on_every_tier(library, tier, monkeypatch):
    # Stride 2 splits each row between two column phases of about W / 2 pixels. Phases narrower than a vector are
    # packed with masked loads and stores, or, on the tiers where those are slow (AVX2, and the generic ones that stand
    # in for it), as whole vectors whose zeroed lanes land on the pad columns and the next phase row: wherever the
    # read stays inside the image and the store inside the phase plane. Phases of 5-17 pixels (around 8 and 16 lanes),
    # images of 1, 2 and 5 rows (the last rows cannot read a whole vector), left pads 0-2 and right pads 0 and 2.
    if not tier_available(tier, library, monkeypatch):
        pytest.skip(f"this CPU cannot run the {tier} tier")
    rng = np.random.default_rng([SEED, 2700 + TIERS.index(tier)])
    for W, H, left, right in itertools.product((11, 14, 15, 17, 30, 33), (1, 2, 5), (0, 1, 2), (0, 2)):
        top, bottom = int(rng.integers(0, 3)), int(rng.integers(0, 3))
        if H + top + bottom >= 3:
            check_case(library, rng, N=int(rng.integers(1, 3)), C=3, O=4, H=H, W=W, stride=2,
                       pads=[top, left, bottom, right], bias=True, activation=ACTIVATIONS[int(rng.integers(0, 4))],
                       threads=1, what="narrow stride-2 rows")


def test_threads_give_identical_results(library):
    rng = np.random.default_rng([SEED, 3000])
    layer = random_pattern_layer(rng, 40, 24, rng.integers(0, 25, 40))
    x = rng.standard_normal((3, 24, 19, 21)).astype(np.float32)
    model = pattern_conv_model(layer, x.shape)
    one, two = (session(model, t, library).run(None, {"X": x})[0] for t in (1, 2))
    np.testing.assert_array_equal(one, two)  # each output element is summed in the same order by one thread


# ---- malformed nodes: an onnxruntime error at session creation or at run time, never a crash ----


def _layer():
    return random_pattern_layer(np.random.default_rng(1), 4, 3, [3, 2, 1, 0])


def _expect_error(library, model, x_shape, match, dtype=np.float32):
    with pytest.raises(ORT_ERRORS, match=match):
        sess = session(model, 1, library)
        sess.run(None, {"X": np.zeros(x_shape, dtype)})


@pytest.mark.parametrize(
    "overrides, match",
    [
        (lambda L: dict(kernel_patterns=[99] + L.kernel_patterns.tolist()[1:]), "pattern id"),
        (lambda L: dict(kernel_channels=L.kernel_channels.tolist()[:-1]), "same length"),
        (lambda L: dict(kernel_filters=[L.kernel_filters[-1]] + L.kernel_filters.tolist()[1:]), "filter"),
        (lambda L: dict(kernel_channels=[7] + L.kernel_channels.tolist()[1:]), "input channel"),
        (lambda L: dict(patterns=[0, 1, 2]), "4 taps"),
        (lambda L: dict(patterns=[3, 1, 2, 0] * (len(L.patterns))), "ascending"),
        (lambda L: dict(dilations=[2, 2]), "dilations"),
        (lambda L: dict(group=2), "group"),
        (lambda L: dict(strides=[3, 3]), "strides"),
        (lambda L: dict(weight_shape=[4, 3, 5, 5]), "3x3"),
        (lambda L: dict(activation_min=1.0, activation_max=0.0), "activation_min"),
    ],
)
def test_malformed_attributes_fail_cleanly(library, overrides, match):
    layer = _layer()
    _expect_error(library, pattern_conv_model(layer, (1, 3, 5, 5), **overrides(layer)), (1, 3, 5, 5), match)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (lambda a: dict(filter_runs=a["filter_runs"][:-1]), "pairs"),
        (lambda a: dict(filter_runs=a["filter_runs"][:-1] + [a["filter_runs"][-1] + 1]), "add up"),
        (lambda a: dict(filter_runs=a["filter_runs"][:-1] + [a["filter_runs"][-1] - 1]), "counts"),
        (lambda a: dict(filter_runs=[a["filter_runs"][0], 0] + a["filter_runs"][2:]), "at least 1"),
        (lambda a: dict(filter_runs=[9] + a["filter_runs"][1:]), "filter out of range"),
        (lambda a: dict(kernel_codes=[3 * 99] + a["kernel_codes"][1:]), "input channel"),
        (lambda a: dict(kernel_codes=[-1] + a["kernel_codes"][1:]), "kernel_codes"),
        (lambda a: dict(kernel_filters=[0]), "not both"),
    ],
)
def test_malformed_compact_index_fails_cleanly(library, overrides, match):
    layer = _layer()
    index = pattern_layout.encode(layer.kernel_filters, layer.kernel_channels, layer.kernel_patterns,
                                  len(layer.patterns))
    model = pattern_conv_model(layer, (1, 3, 5, 5))
    node = model.graph.node[0]
    for name, value in overrides(index).items():
        kept = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend(kept + [helper.make_attribute(name, value)])
    _expect_error(library, model, (1, 3, 5, 5), match)


def test_both_index_forms_compute_the_same(library):
    """Models written before the compact index (kernel_filters, kernel_channels, kernel_patterns) still run."""
    rng = np.random.default_rng([SEED, 3100])
    layer = random_pattern_layer(rng, 12, 9, rng.integers(0, 10, 12))
    x = rng.standard_normal((2, 9, 11, 13)).astype(np.float32)
    compact = pattern_conv_model(layer, x.shape)
    assert {a.name for a in compact.graph.node[0].attribute} >= set(pattern_layout.COMPACT)
    older = pattern_conv_model(layer, x.shape, kernel_filters=layer.kernel_filters.tolist())
    assert not {a.name for a in older.graph.node[0].attribute} & set(pattern_layout.COMPACT)
    got = [session(m, 1, library).run(None, {"X": x})[0] for m in (compact, older)]
    np.testing.assert_array_equal(got[0], got[1])
    want = session(dense_conv_model(layer, x.shape), 1).run(None, {"X": x})[0]
    assert np.abs(got[0] - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_non_contiguous_filter_fails(library):
    layer = _layer()  # storage: filter with 3 kernels, then 2, then 1; move one kernel of the first to the end
    order = list(range(1, layer.kept_kernels)) + [0]
    model = pattern_conv_model(layer, (1, 3, 5, 5), kernel_filters=layer.kernel_filters[order].tolist(),
                               kernel_channels=layer.kernel_channels[order].tolist(),
                               kernel_patterns=layer.kernel_patterns[order].tolist())
    _expect_error(library, model, (1, 3, 5, 5), "contiguous|order")


def test_wrong_inputs_fail_cleanly(library):
    layer = _layer()
    sess = session(pattern_conv_model(layer, None), 1, library)  # X of unknown rank: the kernel checks it
    for shape, match in [((1, 4, 5, 5), "channels"), ((3, 5, 5), "4-D"), ((1, 3, 0, 5), "at least 3")]:
        with pytest.raises(ORT_ERRORS, match=match):
            sess.run(None, {"X": np.zeros(shape, np.float32)})
    # W of the wrong shape (an input here, so the check happens at run time) and a wrong bias length.
    model = pattern_conv_model(layer, (1, 3, 5, 5), bias=np.zeros(3, np.float32))
    _expect_error(library, model, (1, 3, 5, 5), "B must have shape")
    model = pattern_conv_model(layer, (1, 3, 5, 5))
    model.graph.initializer[0].CopyFrom(
        __import__("onnx").numpy_helper.from_array(np.zeros((layer.kept_kernels, 3), np.float32), "W"))
    _expect_error(library, model, (1, 3, 5, 5), "W must have shape")


def test_non_float_input_fails_cleanly(library):
    import onnx

    model = pattern_conv_model(_layer(), (1, 3, 5, 5))
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    with pytest.raises(ORT_ERRORS):
        session(model, 1, library).run(None, {"X": np.zeros((1, 3, 5, 5), np.float64)})


def test_unknown_forced_isa_fails_cleanly(library, monkeypatch):
    monkeypatch.setenv("CTPRUNE_FORCE_ISA", "sse9")
    with pytest.raises(ORT_ERRORS, match="CTPRUNE_FORCE_ISA"):
        session(pattern_conv_model(_layer(), (1, 3, 5, 5)), 1, library)
