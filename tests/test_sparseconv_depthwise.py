"""SparseConv's depthwise path on the CPU (a Conv with one input channel per group, group == C == O, dilation 1,
equal strides 1 or 2, kernel up to 7x7: its own kernel on the dense per-channel weights) against onnxruntime's own Conv
on the rebuilt dense weight and against the model-local function, on fresh random layers (CTPRUNE_TEST_SEED=<n>
replays a run; the seed is in every failure message).

Covered: kernels 3x3, 5x5, 7x7 and others up to 7 (1x3, 7x1, 2x4, 1x1), strides 1 and 2, pads 0 and asymmetric ones
larger than the kernel, odd widths and planes of 1..40 (and larger ones, cut in row strips), C 1..40, batch 1 and 2,
taps the node does not keep, every block size, empty blocks, bias on/off, every activation, Z full and one element;
W a constant initializer (made dense once) and a graph input (made dense per call); NaN and inf in X and Z; the path
off (CTPRUNE_SPARSE_DEPTHWISE=0) gives the same; channel multipliers > 1, dilation and other strides take the general
path. Every tier this CPU runs (CTPRUNE_FORCE_ISA), 1 and 2 threads, outputs poisoned with NaN first."""

import os
import secrets

import numpy as np
import onnx
import pytest

from ctprune.lab.layer_model import sparse_and_dense_models
from conftest import skip_without_library
from test_hardening_nan import assert_same
from test_sparseconv_kernel import ACTIVATIONS, TIERS, kernel_run, plain_run, tier  # noqa: F401

SEED = int(os.environ.get("CTPRUNE_TEST_SEED", secrets.randbits(32)))

pytestmark = skip_without_library()

KERNELS = [(3, 3), (3, 3), (5, 5), (5, 5), (7, 7), (1, 3), (7, 1), (2, 4), (1, 1)]


def _case(rng, multiplier=1, **fixed):
    """A random layer; `fixed` sets any of its fields (H and W are drawn to fit the kernel and pads)."""
    kh, kw = fixed.get("kernel", KERNELS[int(rng.integers(0, len(KERNELS)))])
    stride = int(rng.integers(1, 3))
    # Pads 0 half the time, else up to the kernel's size and past it (asymmetric).
    pads = (0, 0, 0, 0) if rng.integers(0, 2) else tuple(int(p) for p in rng.integers(0, [kh + 1, kw + 1] * 2))
    pads = fixed.get("pads", pads)
    dh, dw = fixed.get("dilations", (1, 1))
    H = int(rng.integers(max(1, dh * (kh - 1) + 1 - pads[0] - pads[2]), 41))
    W = int(rng.integers(max(1, dw * (kw - 1) + 1 - pads[1] - pads[3]), 41))
    C = int(rng.choice([1, 2, 3, 7, 8, 16, 29, 40]))
    case = dict(C=C, multiplier=multiplier, kernel=(kh, kw), strides=(stride, stride), pads=pads, H=H, W=W,
                N=int(rng.choice([1, 1, 2])), block=int(rng.choice([1, 2, 4, 8])),
                density=float(rng.choice([1.0, 1.0, 0.5, 0.8])), empty=int(rng.integers(0, 2)),
                bias=bool(rng.integers(0, 2)), activation=ACTIVATIONS[int(rng.integers(0, len(ACTIVATIONS)))],
                residual=str(rng.choice(["none", "full", "one"])), threads=int(rng.integers(1, 3)),
                w_input=bool(rng.integers(0, 4) == 0))
    case.update(fixed)
    return case


def _output_shape(case):
    (kh, kw), (sh, sw), (pt, pl, pb, pr) = case["kernel"], case["strides"], case["pads"]
    OH = (case["H"] + pt + pb - case.get("dilations", (1, 1))[0] * (kh - 1) - 1) // sh + 1
    OW = (case["W"] + pl + pr - case.get("dilations", (1, 1))[1] * (kw - 1) - 1) // sw + 1
    return (case["N"], case["C"] * case["multiplier"], OH, OW)


def _models(case, rng):
    C, m = case["C"], case["multiplier"]
    x_shape = (case["N"], C, case["H"], case["W"])
    y_shape = _output_shape(case)
    z_shape = None if case["residual"] == "none" else (y_shape if case["residual"] == "full" else (1,))
    sparse, dense, compact = sparse_and_dense_models(
        rng, (C * m, 1) + case["kernel"], x_shape, case["density"], case["block"], group=C,
        empty_blocks=case["empty"], bias=case["bias"], strides=case["strides"], pads=case["pads"],
        dilations=case.get("dilations", (1, 1)), activation=case["activation"], z_shape=z_shape)
    feeds = {"X": rng.standard_normal(x_shape).astype(np.float32)}
    if z_shape is not None:
        feeds["Z"] = rng.standard_normal(z_shape).astype(np.float32)
    if case["w_input"]:  # W a graph input, not a constant: the kernel makes it dense per call
        values = next(t for t in sparse.graph.initializer if t.name.endswith(".values"))
        feeds_w = {values.name: onnx.numpy_helper.to_array(values).copy()}
        sparse.graph.initializer.remove(values)
        sparse.graph.input.append(onnx.helper.make_tensor_value_info(values.name, onnx.TensorProto.FLOAT,
                                                                     list(values.dims)))
    else:
        feeds_w = {}
    return sparse, dense, feeds, feeds_w, y_shape


def _check(case, seed, nonfinite=False):
    rng = np.random.default_rng(seed)
    sparse, dense, feeds, feeds_w, y_shape = _models(case, rng)
    if nonfinite:  # NaN, +inf and -inf in X and in Z: each spreads over the windows that hold it, kept taps or not
        for name in feeds:
            flat = feeds[name].reshape(-1)
            count = min(3, flat.size)
            flat[rng.choice(flat.size, count, replace=False)] = [np.nan, np.inf, -np.inf][:count]
    expected = plain_run(dense, feeds)
    via_function = plain_run(sparse, {**feeds, **feeds_w})
    got = kernel_run(sparse, {**feeds, **feeds_w}, y_shape, case["threads"])
    msg = f"CTPRUNE_TEST_SEED={SEED} seed={seed} case={case}"
    if not nonfinite:
        assert not np.isnan(got).any(), "unwritten (poisoned) outputs: " + msg
    assert_same(got, expected, msg)
    assert_same(got, via_function, msg)


@pytest.mark.parametrize("tier", TIERS, indirect=True)
@pytest.mark.parametrize("index", range(8))
def test_random_depthwise_layers(tier, index):
    rng = np.random.default_rng([SEED, index, TIERS.index(tier)])
    for _ in range(5):
        _check(_case(rng), int(rng.integers(2**31)))


@pytest.mark.parametrize("tier", TIERS, indirect=True)
def test_every_activation_and_residual(tier):
    rng = np.random.default_rng([SEED, 101, TIERS.index(tier)])
    for i, activation in enumerate(ACTIVATIONS):
        for residual in ("none", "full", "one"):
            case = _case(rng, activation=activation, residual=residual, kernel=[(3, 3), (5, 5)][i % 2],
                         strides=[(1, 1), (2, 2)][(i // 2) % 2], pads=(1, 2, 2, 1), bias=True)
            _check(case, int(rng.integers(2**31)))


@pytest.mark.parametrize("tier", TIERS, indirect=True)
def test_nan_and_inf_propagate_like_onnxruntime(tier):
    """The path multiplies every input of a window by the dense weight, zeros included: NaN and inf spread exactly as
    through onnxruntime's Conv on the rebuilt weight, with no separate fix-up."""
    rng = np.random.default_rng([SEED, 202, TIERS.index(tier)])
    for i in range(8):
        case = _case(rng, residual=["full", "one"][i % 2], density=[0.5, 1.0][i // 4 % 2],
                     activation=ACTIVATIONS[i % len(ACTIVATIONS)])
        _check(case, int(rng.integers(2**31)), nonfinite=True)


@pytest.mark.parametrize("tier", TIERS, indirect=True)
def test_row_strips_and_odd_widths(tier):
    """Planes whose padded rows do not fit the kernel's scratch at once run in row strips (several work items per
    channel), with widths that are no multiple of the lanes and strips that end in partial steps."""
    rng = np.random.default_rng([SEED, 303, TIERS.index(tier)])
    for H, W, kernel, stride, pads in [(101, 61, (3, 3), 1, (1, 1, 1, 1)), (97, 130, (3, 3), 2, (1, 0, 1, 1)),
                                       (70, 117, (5, 5), 1, (2, 2, 2, 2)), (150, 150, (3, 3), 2, (0, 1, 1, 0)),
                                       (64, 200, (7, 7), 1, (3, 3, 3, 3)), (57, 33, (5, 5), 2, (2, 2, 2, 2))]:
        case = _case(rng, C=int(rng.integers(1, 5)), H=H, W=W, kernel=kernel, strides=(stride, stride), pads=pads,
                     N=1, threads=int(rng.integers(1, 3)))
        _check(case, int(rng.integers(2**31)))


@pytest.mark.parametrize("tier", TIERS, indirect=True)
@pytest.mark.parametrize("k", [3, 5])
def test_narrow_rows(tier, k):
    """3x3 and 5x5 with output rows of at most one vector take their own kernel (the rows streamed once, whole-vector
    stores running into the next rows): every width 1..9 around the tiers' 8 and 16 lanes, both strides, pads up to
    the kernel's half on any side, planes tall enough to run in several row strips (partial last vectors at a
    strip's end, two threads), residuals and activations."""
    rng = np.random.default_rng([SEED, 606, k, TIERS.index(tier)])
    for i, OW in enumerate(list(range(1, 10)) + [15, 16, 17]):
        stride = 1 + i % 2
        pads = tuple(int(p) for p in rng.integers(0, k // 2 + 1, 4))
        W = (OW - 1) * stride + k - pads[1] - pads[3]
        if W < 1:
            pads, W = (k // 2,) * 4, (OW - 1) * stride + 1
        H = int(rng.choice([1, 2, 5, 7, 600])) + k - 1
        case = _case(rng, kernel=(k, k), strides=(stride, stride), pads=pads, W=W, H=H,
                     C=int(rng.choice([1, 3, 16])), residual=["none", "full", "one"][i % 3],
                     activation=ACTIVATIONS[i % len(ACTIVATIONS)], threads=1 + (H > 100))
        assert _output_shape(case)[3] == OW, case
        _check(case, int(rng.integers(2**31)))


def test_narrow_rows_on_the_chosen_tier(monkeypatch):
    """The tier chosen from the CPU (no CTPRUNE_FORCE_ISA) runs output rows of at most 8 in 8-float vectors where
    its own are wider (dispatch.h, NarrowPlaneKernels: on AVX-512, the AVX2 tier's depthwise kernel): output widths
    6-9 around that boundary, both strides, residuals and activations."""
    monkeypatch.delenv("CTPRUNE_FORCE_ISA", raising=False)
    monkeypatch.setenv("CTPRUNE_POISON_OUTPUT", "1")
    rng = np.random.default_rng([SEED, 404])
    for i, (OW, stride) in enumerate([(6, 1), (7, 1), (8, 1), (9, 1), (7, 2), (8, 2), (9, 2)]):
        case = _case(rng, kernel=(3, 3), strides=(stride, stride), pads=(1, 1, 1, 1), W=OW * stride,
                     H=int(rng.integers(3, 12)), residual=["none", "full", "one"][i % 3])
        assert _output_shape(case)[3] == OW
        _check(case, int(rng.integers(2**31)))


@pytest.mark.parametrize("tier", TIERS, indirect=True)
def test_path_off_gives_the_same(tier, monkeypatch):
    """CTPRUNE_SPARSE_DEPTHWISE=0 (the general path, for A/B measurements) on the same layers."""
    monkeypatch.setenv("CTPRUNE_SPARSE_DEPTHWISE", "0")
    rng = np.random.default_rng([SEED, 404, TIERS.index(tier)])
    for _ in range(4):
        _check(_case(rng), int(rng.integers(2**31)))


@pytest.mark.parametrize("tier", TIERS, indirect=True)
def test_other_depthwise_shapes_take_the_general_path(tier):
    """A channel multiplier > 1, dilation, stride 3 and unequal strides are outside the path: the general path gives
    them (the shapes differ only in those attributes from ones the path runs)."""
    rng = np.random.default_rng([SEED, 505, TIERS.index(tier)])
    for fixed in [dict(multiplier=2), dict(multiplier=3, kernel=(5, 5)), dict(dilations=(2, 2), kernel=(3, 3)),
                  dict(strides=(3, 3)), dict(strides=(1, 2)), dict(kernel=(9, 9), pads=(4, 4, 4, 4))]:
        _check(_case(rng, **fixed), int(rng.integers(2**31)))
