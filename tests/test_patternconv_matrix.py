"""The randomized PatternConv matrix (issue 3): ctprune's kernel vs onnxruntime's Conv on the masked dense weights and
vs the reference function, within 1e-5 relative (max |a - b| / max |b|; with a fused activation the yardstick is
the output's scale before the activation, see unclipped_scale).

Sampled from: batch 1/3/8; C and O 1..512 (odd ones included); H and W 1..64; stride 1/2; pads 0/1; bias on/off;
fused activation none/Relu/Relu6/Clip; filters with every kernel removed; every library pattern in use; 1 and 2
threads. The corners are fixed cases, the rest fresh random ones (CTPRUNE_TEST_SEED=<n> replays a run; the seed is in
every failure message), each capped in work so the whole file takes seconds. The kernel writes into an output buffer
poisoned with NaN, so an element it never writes shows."""

import math
import os
import secrets

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ctprune.rewrite import dense_from_compact
from ctprune.lab.layer_model import dense_conv_layer_model, pattern_and_dense_models, random_layer_patterns
from ctprune.runtime import session_options
from conftest import skip_without_library

SEED = int(os.environ.get("CTPRUNE_TEST_SEED", secrets.randbits(32)))
SAMPLED = 40
MAX_MACS = 4e7  # per case (dense-equivalent multiply-adds): keeps the reference Conv runs short
ACTIVATIONS = {"none": (-math.inf, math.inf), "relu": (0.0, math.inf), "relu6": (0.0, 6.0), "clip": (-0.3, 0.4)}


needs_library = skip_without_library()


def _case(N, C, O, H, W, stride, pad, bias, activation, kept, empty, library, threads):
    return dict(N=N, C=C, O=O, H=H, W=W, stride=stride, pad=pad, bias=bias, activation=activation, kept=kept,
                empty=empty, library=library, threads=threads)


CORNERS = [
    _case(1, 1, 1, 1, 1, 1, 1, False, "none", 1.0, 0, 1, 1),  # smallest: one tap row/col of a 1x1 image
    _case(1, 512, 512, 4, 4, 1, 1, True, "relu", 0.125, 16, 8, 2),  # widest, 8x
    _case(8, 3, 5, 64, 64, 2, 1, True, "relu6", 0.6, 1, 4, 2),  # largest image, odd channels, stride 2
    _case(3, 511, 7, 7, 9, 1, 0, False, "clip", 0.25, 2, 12, 1),  # odd C = 511, no padding
    _case(1, 64, 64, 57, 33, 1, 1, True, "none", 1.0, 0, 8, 1),  # patterns only (2.25x), odd sizes
    _case(1, 16, 9, 3, 64, 2, 0, True, "relu", 0.0, 0, 4, 2),  # every kernel removed: bias then activation
    _case(8, 33, 31, 2, 2, 2, 1, False, "none", 0.0625, 5, 8, 1),  # 16x, tiny image, stride 2
]


def sampled_cases(seed: int, count: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < count:
        C, O = (int(min(512, max(1, round(2 ** rng.uniform(0, 9)) + rng.integers(-1, 2)))) for _ in range(2))
        H, W = (int(rng.integers(1, 65)) for _ in range(2))
        stride, pad = int(rng.integers(1, 3)), int(rng.integers(0, 2))
        if min(H, W) + 2 * pad < 3:
            pad = 1
        N = int(rng.choice([1, 3, 8]))
        out_pixels = lambda h, w: ((h + 2 * pad - 3) // stride + 1) * ((w + 2 * pad - 3) // stride + 1)
        while N * O * C * 9 * out_pixels(H, W) > MAX_MACS and max(H, W) > 3:
            H, W = max(3, H * 3 // 4), max(3, W * 3 // 4)
        if N * O * C * 9 * out_pixels(H, W) > MAX_MACS:
            continue
        cases.append(_case(
            N, C, O, H, W, stride, pad, bool(rng.integers(0, 2)), str(rng.choice(list(ACTIVATIONS))),
            float(rng.choice([1.0, 0.44, 0.25, 0.125, 0.0625])), int(rng.integers(0, O // 3 + 1)),
            int(rng.choice([4, 8, 12])), int(rng.integers(1, 3)),
        ))
    return cases


CASES = CORNERS + sampled_cases(SEED, SAMPLED)


def _ids(cases):
    return [f"N{c['N']}-C{c['C']}-O{c['O']}-{c['H']}x{c['W']}-s{c['stride']}-p{c['pad']}-k{c['kept']}-t{c['threads']}" for c in cases]


def build(case, seed):
    rng = np.random.default_rng(seed)
    patterns = random_layer_patterns(rng, case["O"], case["C"], case["kept"], case["library"], case["empty"])
    pads = (case["pad"],) * 4
    pattern_model, dense_model, compact = pattern_and_dense_models(
        rng, patterns, ["N", case["C"], case["H"], case["W"]], case["bias"], (case["stride"],) * 2, pads,
        ACTIVATIONS[case["activation"]],
    )
    x = rng.standard_normal((case["N"], case["C"], case["H"], case["W"])).astype(np.float32)
    return pattern_model, dense_model, compact, x


def plain_run(model, x, threads) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]


def kernel_run(model, x, out_shape, threads) -> np.ndarray:
    """Run through ctprune's kernel, writing into a NaN-poisoned output buffer."""
    session = ort.InferenceSession(model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])
    out = np.full(out_shape, np.nan, dtype=np.float32)
    binding = session.io_binding()
    binding.bind_cpu_input("X", x)
    binding.bind_ortvalue_output("Y", ort.OrtValue.ortvalue_from_numpy(out))
    session.run_with_iobinding(binding)
    assert binding.get_outputs()[0].data_ptr() == out.ctypes.data, "onnxruntime did not write into the bound buffer"
    return out  # not get_outputs()[0].numpy(): that is a view which does not keep `out` alive


def rel_err(a, b, scale=None) -> float:
    """max |a - b| / max |b|, or / `scale` when given."""
    scale = np.abs(b).max() if scale is None else scale
    return float(np.abs(a.astype(np.float64) - b).max() / max(scale, 1e-30))


def unclipped_scale(pattern_model, compact, case, x) -> float:
    """max |Conv output| before the activation: a Clip (say -0.3..0.4, or Relu6) after a sum over hundreds of channels
    would otherwise turn float32 rounding of the sum into a large error relative to the clipped range. Clip is
    1-Lipschitz, so the clipped error is bounded by the unclipped one: the honest yardstick is the unclipped scale."""
    bias = next((onnx.numpy_helper.to_array(t) for t in pattern_model.graph.initializer if t.name == "B"), None)
    model = dense_conv_layer_model(
        dense_from_compact(compact), ["N", case["C"], case["H"], case["W"]], bias, (case["stride"],) * 2, (case["pad"],) * 4
    )
    return float(np.abs(plain_run(model, x, 1)).max())


def check_case(case, seed, with_kernel: bool):
    pattern_model, dense_model, compact, x = build(case, seed)
    where = f"seed {seed} (CTPRUNE_TEST_SEED={SEED}), case {case}"
    if case["kept"] * case["O"] * case["C"] >= case["library"] * 2:
        assert len(set(compact.kernel_patterns.tolist())) == len(compact.patterns), f"not every pattern in use: {where}"
    dense = plain_run(dense_model, x, case["threads"])
    function = plain_run(pattern_model, x, case["threads"])
    assert function.shape == dense.shape
    scale = unclipped_scale(pattern_model, compact, case, x) if case["activation"] != "none" else None
    assert rel_err(function, dense, scale) <= 1e-5, f"reference function vs dense Conv: {where}"
    if with_kernel:
        kernel = kernel_run(pattern_model, x, dense.shape, case["threads"])
        assert not np.isnan(kernel).any(), f"kernel left {int(np.isnan(kernel).sum())} output elements unwritten: {where}"
        assert rel_err(kernel, dense, scale) <= 1e-5, f"kernel vs dense Conv: {where}"
        assert rel_err(kernel, function, scale) <= 1e-5, f"kernel vs reference function: {where}"


@needs_library
@pytest.mark.parametrize("index", range(len(CASES)), ids=_ids(CASES))
def test_kernel_matches_dense_conv_and_reference(index):
    check_case(CASES[index], SEED + index, with_kernel=True)


@pytest.mark.parametrize("index", range(len(CORNERS)), ids=_ids(CORNERS))
def test_reference_function_on_the_corners(index):
    # runs without the library too: the corners through the reference function alone
    check_case(CORNERS[index], SEED + index, with_kernel=False)
