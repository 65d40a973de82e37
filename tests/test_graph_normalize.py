"""normalize(): constant folding that keeps weight names, dynamic batch kept dynamic."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import rel_err, run_ort
from ctprune.graph import lift, load_model, normalize, write_back


def _flatten_by_shape_chain(batch):
    """Conv -> Reshape(x, Concat(Gather(Shape(x), 0), [-1])) -> MatMul(Transpose(W)): a torch-style flatten and a
    tf-style transposed weight."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv.w"),
        numpy_helper.from_array(rng.standard_normal((5, 64)).astype(np.float32), "fc.w"),  # stored [out, in]
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.w"], ["c"], name="conv", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["c"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "zero"], ["n"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["n"], ["n1"], name="unsq", axes=[0]),
        helper.make_node("Concat", ["n1", "minus_one"], ["newshape"], name="concat", axis=0),
        helper.make_node("Reshape", ["c", "newshape"], ["flat"], name="reshape"),
        helper.make_node("Transpose", ["fc.w"], ["fc.wt"], name="transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["flat", "fc.wt"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])], inits)
    return load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]))


def test_static_shape_chain_folds_and_weight_names_survive():
    model = _flatten_by_shape_chain(2)
    norm = normalize(model)
    ops = [n.op_type for n in norm.graph.node]
    assert "Shape" not in ops and "Gather" not in ops and "Concat" not in ops  # folded for the static shape
    assert "Transpose" in ops  # the weight's pass-through is kept, so the stored tensor stays trainable
    tg = lift(model)
    assert set(tg.onnx_parameters()) == {"conv.w", "fc.w"}
    x = np.random.default_rng().standard_normal((2, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        assert rel_err(tg(torch.from_numpy(x)).numpy(), run_ort(model, x)[0]) < 1e-5
    with torch.no_grad():
        tg.onnx_parameters()["fc.w"].mul_(-2)
    trained = write_back(model, tg)
    with torch.no_grad():
        assert rel_err(tg(torch.from_numpy(x)).numpy(), run_ort(trained, x)[0]) < 1e-5


def test_dynamic_batch_stays_dynamic():
    model = _flatten_by_shape_chain("batch")
    norm = normalize(model)
    assert "Shape" in [n.op_type for n in norm.graph.node]  # the batch size is read at run time
    tg = lift(model).eval()
    assert tg.input_shapes == [(None, 3, 8, 8)]
    for batch in (1, 5):
        x = np.random.default_rng().standard_normal((batch, 3, 8, 8)).astype(np.float32)
        with torch.no_grad():
            got = tg(torch.from_numpy(x)).numpy()
        assert got.shape == (batch, 5)
        assert rel_err(got, run_ort(model, x)[0]) < 1e-5
    # a user-given input shape fixes the batch and folds the chain
    assert "Shape" not in [n.op_type for n in normalize(model, (3, 3, 8, 8)).graph.node]


def test_constant_of_shape_weight_written_back_as_constant_node():
    rng = np.random.default_rng()
    inits = [numpy_helper.from_array(np.array([4, 3, 1, 1], np.int64), "w_shape")]
    nodes = [
        helper.make_node("ConstantOfShape", ["w_shape"], ["w"], name="placeholder",
                         value=numpy_helper.from_array(np.array([0.5], np.float32))),
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], inits)
    model = load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    tg = lift(model)
    assert list(tg.onnx_parameters()) == ["w"]
    with torch.no_grad():
        tg.onnx_parameters()["w"].copy_(torch.from_numpy(rng.standard_normal((4, 3, 1, 1)).astype(np.float32)))
    trained = write_back(model, tg)
    node = trained.graph.node[0]
    assert (node.op_type, node.name, list(node.output)) == ("Constant", "placeholder", ["w"])
    x = rng.standard_normal((1, 3, 4, 4)).astype(np.float32)
    with torch.no_grad():
        assert rel_err(run_ort(trained, x)[0], tg(torch.from_numpy(x)).numpy()) < 1e-5
