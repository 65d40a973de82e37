"""A per-channel affine after a pruned Conv (Mul and / or Add of constants of one element or one per channel, as
PP-LCNetV3-style nets export their learnable affine) folds into the PatternConv / SparseConv like a BatchNormalization;
a constant that would broadcast along the width does not."""

from __future__ import annotations

import secrets

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import ctprune
from conftest import rel_err, run_ort

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(rng, scale_shape, shift_shape):
    """stem 3x3 -> A 3x3 (pattern) -> Mul(scale) -> Add(shift) -> Relu -> B 1x1 (sparse) -> Mul -> Add -> GAP -> head."""
    def w(*shape):
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)
    inits = [numpy_helper.from_array(v, n) for n, v in [
        ("stem", w(32, 3, 3, 3)), ("a", w(32, 32, 3, 3)), ("ab", w(32)), ("b", w(64, 32, 1, 1)), ("fc", w(10, 64)),
        ("a_scale", w(*scale_shape) + 1), ("a_shift", w(*shift_shape)),
        ("b_scale", w(*[64 if d == 32 else d for d in scale_shape]) + 1),
        ("b_shift", w(*[64 if d == 32 else d for d in shift_shape]))]]
    nodes = [
        helper.make_node("Conv", ["x", "stem"], ["s"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["s", "a", "ab"], ["ya"], name="A", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["a_scale", "ya"], ["ma"], name="A_mul"),  # constant first: either order folds
        helper.make_node("Add", ["ma", "a_shift"], ["za"], name="A_add"),
        helper.make_node("Relu", ["za"], ["ra"], name="A_relu"),
        helper.make_node("Conv", ["ra", "b"], ["yb"], name="B"),
        helper.make_node("Mul", ["yb", "b_scale"], ["mb"], name="B_mul"),
        helper.make_node("Add", ["mb", "b_shift"], ["zb"], name="B_add"),
        helper.make_node("GlobalAveragePool", ["zb"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc"], ["y"], name="head", transB=1),
    ]
    graph = helper.make_graph(nodes, "affine", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("scale_shape,shift_shape,folds", [
    ((1, 32, 1, 1), (), True),
    ((), (32, 1, 1), True),
    ((1,), (1, 32, 1, 1), True),
    ((32, 1, 1), (16,), False),  # (16,) broadcasts along the width: not per channel, so the Add stays
], ids=["channel-scale", "channel-shift", "scalars", "width-shift"])
def test_per_channel_affine_folds_into_the_pruned_op(scale_shape, shift_shape, folds):
    seed = secrets.randbits(32)
    result = ctprune.prune(_model(np.random.default_rng(seed), scale_shape, shift_shape), ratio=8, epochs=0, seed=1)
    nodes = {n.name: n for n in result.model.graph.node}
    forms = {layer["name"]: layer["form"] for layer in result.report["layers"]}
    assert forms == {"A": "pattern", "B": "sparse"}, forms
    assert nodes["A"].op_type == "PatternConv" and nodes["B"].op_type == "SparseConv"
    if folds:
        assert not {"A_mul", "A_add", "A_relu", "B_mul", "B_add"} & set(nodes)
        assert nodes["A"].output[0] == "ra" and nodes["B"].output[0] == "zb"
    else:  # the Mul folds; the Add with a width-broadcast constant stays, and so does the Relu after it
        assert {"A_add", "A_relu", "B_add"} <= set(nodes) and "A_mul" not in nodes
    x = np.random.default_rng(seed).standard_normal((2, 3, 16, 16)).astype(np.float32)
    want = run_ort(result.masked_dense, x)[0]
    assert rel_err(run_ort(result.model, x)[0], want) < 1e-4, f"functions, seed {seed}"
    sess = ctprune.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert rel_err(sess.run(None, {"x": x})[0], want) < 1e-4, f"kernels, seed {seed}"
