"""The PatternConv reference function (ops/reference.py) against onnxruntime's own Conv on the masked dense weights,
and the numpy reference against both; plus the converter's round trip (ctprune/rewrite/pattern_conv.py)."""

import secrets

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ctprune.errors import GraphError
from ctprune.ops import dense_weight_from_compact, pattern_conv_function, pattern_conv_numpy, pattern_layout
from ctprune.rewrite import LayerPatterns, compact_from_dense, dense_from_compact, patterns_from_compact
from ctprune.lab.layer_model import masked_weight, pattern_and_dense_models, random_layer_patterns

NO_ACTIVATION = (float("-inf"), float("inf"))


def plain_session(model: onnx.ModelProto) -> ort.InferenceSession:
    """onnxruntime without ctprune's library: PatternConv runs as its model-local function."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def test_worked_example_of_the_spec():
    # ops/PatternConv.md, "Worked example"
    a, b, c, d, e, f, g, h, i, j, k, l = range(1, 13)
    W = np.array([[a, b, c, d], [e, f, g, h], [i, j, k, l]], dtype=np.float32)
    dense = dense_weight_from_compact(W, [2, 3, 3, 3], [1, 3, 4, 5, 0, 1, 3, 4], [1, 1, 0], [2, 0, 1], [0, 1, 0])
    expected = np.zeros((2, 3, 3, 3), np.float32)
    expected[1, 2] = [[0, a, 0], [b, c, d], [0, 0, 0]]
    expected[1, 0] = [[e, f, 0], [g, h, 0], [0, 0, 0]]
    expected[0, 1] = [[0, i, 0], [j, k, l], [0, 0, 0]]
    np.testing.assert_array_equal(dense, expected)

    # and the converter writes exactly the spec's storage order for it
    assignment = np.array([[-1, 0, -1], [1, -1, 0]])
    compact = compact_from_dense(expected, LayerPatterns(np.array([[1, 3, 4, 5], [0, 1, 3, 4]]), assignment))
    assert compact.attributes() == {
        "weight_shape": [2, 3, 3, 3],
        "patterns": [1, 3, 4, 5, 0, 1, 3, 4],
        "filter_runs": [1, 2, 0, 1],  # filter 1 keeps 2 kernels, then filter 0 keeps 1
        "kernel_codes": [4, 1, 2],  # input channel * 2 patterns + pattern id: (2, 0), (0, 1), (1, 0)
    }
    np.testing.assert_array_equal(np.stack(pattern_layout.decode(compact.attributes())), [[1, 1, 0], [2, 0, 1], [0, 1, 0]])
    np.testing.assert_array_equal(compact.weights, W)


# (N, C, O, H, W, stride, pads, bias, activation, kept fraction, empty filters, library size)
CASES = [
    (1, 1, 1, 1, 1, 1, (1, 1, 1, 1), False, NO_ACTIVATION, 1.0, 0, 1),
    (1, 3, 5, 7, 6, 1, (1, 1, 1, 1), True, NO_ACTIVATION, 0.6, 1, 4),
    (2, 4, 8, 9, 9, 2, (1, 1, 1, 1), True, (0.0, float("inf")), 0.5, 2, 8),
    (3, 16, 16, 8, 13, 1, (0, 0, 0, 0), False, (0.0, 6.0), 0.3, 3, 8),
    (1, 17, 9, 5, 5, 2, (0, 0, 0, 0), True, (-0.5, 0.25), 0.25, 0, 12),
    (2, 32, 24, 12, 10, 2, (1, 0, 0, 1), True, (0.0, float("inf")), 0.125, 5, 8),
    (1, 8, 4, 3, 3, 1, (0, 0, 0, 0), False, NO_ACTIVATION, 0.0, 0, 4),  # every kernel removed
    (8, 5, 7, 4, 11, 1, (1, 1, 1, 1), True, NO_ACTIVATION, 1.0, 0, 12),  # patterns only
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_function_matches_conv_on_masked_dense_weights(case):
    N, C, O, H, W, stride, pads, bias, activation, kept, empty, library_size = case
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    patterns = random_layer_patterns(rng, O, C, kept, library_size, empty)
    pattern_model, dense_model, compact = pattern_and_dense_models(
        rng, patterns, [N, C, H, W], bias, (stride, stride), pads, activation
    )
    onnx.checker.check_model(pattern_model, full_check=True)
    if kept * O * C >= library_size:
        assert set(compact.kernel_patterns.tolist()) == set(range(library_size)), "every pattern should be in use"
    X = rng.standard_normal((N, C, H, W)).astype(np.float32)
    got = plain_session(pattern_model).run(None, {"X": X})[0]
    want = plain_session(dense_model).run(None, {"X": X})[0]
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-5, f"seed {seed}"

    B = None
    for t in pattern_model.graph.initializer:
        if t.name == "B":
            B = onnx.numpy_helper.to_array(t)
    attrs = compact.attributes()
    args = (X, compact.weights, B, attrs["weight_shape"], attrs["patterns"], *pattern_layout.decode(attrs),
            (stride, stride), pads)
    numpy_ref = pattern_conv_numpy(*args, *activation)
    assert numpy_ref.shape == got.shape
    # float32 vs float64: the error scales with the Conv output before a (narrow) activation clips it
    scale = np.abs(pattern_conv_numpy(*args)).max()
    assert np.abs(got - numpy_ref).max() <= 1e-5 * scale, f"seed {seed}"


@pytest.mark.parametrize("opset", [13, 15, 17, 18, 19, 20, 21])
def test_function_is_valid_for_each_opset(opset):
    rng = np.random.default_rng(secrets.randbits(32))
    patterns = random_layer_patterns(rng, 6, 5, 0.5, 4, 1)
    pattern_model, dense_model, _ = pattern_and_dense_models(
        rng, patterns, [2, 5, 6, 7], True, (1, 1), (1, 1, 1, 1), (0.0, 6.0), opset
    )
    assert pattern_model.functions[0].opset_import[0].version == opset
    onnx.checker.check_model(pattern_model, full_check=True)
    X = rng.standard_normal((2, 5, 6, 7)).astype(np.float32)
    got = plain_session(pattern_model).run(None, {"X": X})[0]
    want = plain_session(dense_model).run(None, {"X": X})[0]
    assert rel_err(got, want) <= 1e-5


def test_function_defaults_apply_when_attributes_are_left_out():
    rng = np.random.default_rng(secrets.randbits(32))
    patterns = random_layer_patterns(rng, 4, 3, 0.7, 4)
    pattern_model, dense_model, _ = pattern_and_dense_models(rng, patterns, [1, 3, 5, 5])
    node = pattern_model.graph.node[0]
    optional = {"strides", "pads", "dilations", "group", "activation_min", "activation_max"}
    kept = [a for a in node.attribute if a.name not in optional]
    del node.attribute[:]
    node.attribute.extend(kept)
    onnx.checker.check_model(pattern_model, full_check=True)
    X = rng.standard_normal((1, 3, 5, 5)).astype(np.float32)
    got = plain_session(pattern_model).run(None, {"X": X})[0]
    assert got.shape == (1, 4, 3, 3)
    assert rel_err(got, plain_session(dense_model).run(None, {"X": X})[0]) <= 1e-5


def test_function_rejects_opsets_below_13():
    with pytest.raises(ValueError, match="13"):
        pattern_conv_function(12)


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (16, 33), (64, 64)])
def test_converter_round_trip(shape):
    O, C = shape
    rng = np.random.default_rng(secrets.randbits(32))
    patterns = random_layer_patterns(rng, O, C, float(rng.uniform(0.05, 1.0)), 8, empty_filters=O // 4)
    weight = masked_weight(rng, patterns)
    compact = compact_from_dense(weight, patterns)
    K = patterns.kept_kernels()
    assert compact.weights.shape == (K, 4) and compact.weights.dtype == np.float32
    np.testing.assert_array_equal(dense_from_compact(compact), weight)
    attrs = compact.attributes()
    np.testing.assert_array_equal(
        dense_weight_from_compact(compact.weights, attrs["weight_shape"], attrs["patterns"],
                                  *pattern_layout.decode(attrs)),
        weight,
    )
    back = patterns_from_compact(compact)
    np.testing.assert_array_equal(back.assignment, patterns.assignment)
    np.testing.assert_array_equal(back.library, np.sort(patterns.library, axis=1))

    # storage order: filters by decreasing kept kernels, contiguous; inside a filter by pattern, then channel
    f, p, c = compact.kernel_filters, compact.kernel_patterns, compact.kernel_channels
    runs = [int(f[0])] + [int(b) for a, b in zip(f[:-1], f[1:]) if a != b] if K else []
    assert len(runs) == len(set(runs)), "each filter's kernels must be contiguous"
    counts = [int((f == r).sum()) for r in runs]
    assert counts == sorted(counts, reverse=True)
    for r in runs:
        keys = list(zip(p[f == r].tolist(), c[f == r].tolist()))
        assert keys == sorted(keys)


def test_converter_unsorted_library_rows_keep_their_taps():
    rng = np.random.default_rng(secrets.randbits(32))
    patterns = random_layer_patterns(rng, 5, 4, 0.8, 4)
    weight = masked_weight(rng, patterns)
    shuffled = LayerPatterns(np.array([rng.permutation(row) for row in patterns.library]), patterns.assignment)
    np.testing.assert_array_equal(dense_from_compact(compact_from_dense(weight, shuffled)), weight)


def test_converter_checks_the_mask():
    rng = np.random.default_rng(secrets.randbits(32))
    patterns = random_layer_patterns(rng, 4, 4, 0.5, 4)
    weight = masked_weight(rng, patterns)
    o, c = np.argwhere(patterns.assignment == -1)[0]
    weight[o, c, 1, 1] = 0.5  # a weight inside a removed kernel
    with pytest.raises(GraphError, match=f"filter {o}, channel {c}"):
        compact_from_dense(weight, patterns, where="conv7")
    compact = compact_from_dense(weight, patterns, require_masked=False)
    np.testing.assert_array_equal(dense_from_compact(compact), weight * patterns.mask())


@pytest.mark.parametrize(
    "library, assignment, message",
    [
        (np.array([[0, 1, 2]]), np.zeros((2, 2), int), r"\(P, 4\)"),
        (np.array([[0, 1, 2, 9]]), np.zeros((2, 2), int), "0..8"),
        (np.array([[0, 1, 1, 2]]), np.zeros((2, 2), int), "distinct"),
        (np.array([[0, 1, 2, 3]]), np.full((2, 2), 1), "pattern ids"),
        (np.array([[0, 1, 2, 3]]), np.zeros((3, 2), int), "assignment has shape"),
    ],
)
def test_converter_rejects_malformed_patterns(library, assignment, message):
    with pytest.raises(GraphError, match=message):
        compact_from_dense(np.zeros((2, 2, 3, 3), np.float32), LayerPatterns(library, assignment))
