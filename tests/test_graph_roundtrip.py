"""lift -> a few training steps -> write_back: onnxruntime runs the trained weights, and only they changed."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch

from conftest import rel_err, run_ort
from ctprune.graph import lift, load_model, write_back
from graph_nets import export


def initializers_to_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Paddle-style storage: every initializer becomes a Constant node in front of the graph."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = [
        onnx.helper.make_node("Constant", [], [t.name], name=f"const_{i}", value=t)
        for i, t in enumerate(m.graph.initializer)
    ]
    del m.graph.initializer[:]
    old = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes + old)
    return m


def stored_tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            out[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
    return out


def structure(model: onnx.ModelProto):
    """Everything but the tensor values: nodes (Constant values blanked), inputs, outputs, opsets, metadata."""
    nodes = []
    for n in model.graph.node:
        n2 = onnx.NodeProto()
        n2.CopyFrom(n)
        if n2.op_type == "Constant":
            del n2.attribute[:]
        nodes.append(n2.SerializeToString())
    return (
        nodes,
        [i.SerializeToString() for i in model.graph.input],
        [o.SerializeToString() for o in model.graph.output],
        [(o.domain, o.version) for o in model.opset_import],
        [(p.key, p.value) for p in model.metadata_props],
        model.ir_version,
        sorted(stored_tensors(model)),
    )


@pytest.mark.parametrize("storage", ["initializers", "constant_nodes"])
def test_train_write_back_round_trip(storage):
    exported = export("resnet", "torchscript17", keep_bn=True)
    onnx.helper.set_model_props(exported, {"owner": "test"})
    if storage == "constant_nodes":
        exported = initializers_to_constant_nodes(exported)
    original = load_model(exported.SerializeToString())
    snapshot = original.SerializeToString()
    assert any(n.op_type == "BatchNormalization" for n in original.graph.node)

    tg = lift(original)
    params, stats = tg.onnx_parameters(), tg.onnx_buffers()
    assert stats, "BN running statistics must be lifted as buffers"
    stats_before = {k: v.clone() for k, v in stats.items()}
    rng = np.random.default_rng()
    x = torch.from_numpy(rng.standard_normal((8, 3, 32, 32)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 10, 8))
    opt = torch.optim.SGD(tg.parameters(), lr=0.05, momentum=0.9)
    tg.train()
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(tg(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    tg.eval()
    with torch.no_grad():
        final = torch.nn.functional.cross_entropy(tg(x), y).item()
    assert final < losses[0], f"loss did not go down: {losses} then {final}"
    assert all(not torch.equal(stats_before[k], stats[k]) for k in stats), "BN running stats did not change"

    trained = write_back(original, tg)
    onnx.checker.check_model(trained, full_check=True)
    assert original.SerializeToString() == snapshot, "write_back modified its input"

    x_eval = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = tg(torch.from_numpy(x_eval)).numpy()
    got = run_ort(trained, x_eval)[0]
    assert rel_err(got, want) < 1e-4

    # Only the trained tensors differ; everything else is byte-identical.
    assert structure(trained) == structure(original)
    before, after = stored_tensors(original), stored_tensors(trained)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    trained_names = set(params) | set(stats)
    assert changed == trained_names, f"unexpected: {sorted(changed ^ trained_names)}"


def test_ir3_model_write_back():
    """IR-3 light model (initializers repeated as graph inputs): perturbed weights written back run in onnxruntime."""
    from conftest import light_model_path, randomize_placeholders

    path = light_model_path("squeezenet")
    if not path.exists():
        pytest.skip("light_squeezenet is not in this onnx wheel")
    from test_graph_parity import without_final_squash

    # logits, not the final Softmax: with random weights it is near one-hot and a near-tie flips it
    original = load_model(without_final_squash(randomize_placeholders(onnx.load(path), seed=3)))
    assert original.ir_version == 3
    tg = lift(original).eval()
    with torch.no_grad():
        for p in tg.onnx_parameters().values():
            p.mul_(1.1).add_(0.01)
    trained = write_back(original, tg)
    onnx.checker.check_model(trained, full_check=True)
    assert [i.name for i in trained.graph.input] == [i.name for i in original.graph.input]
    x = np.random.default_rng().standard_normal((1, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        want = tg(torch.from_numpy(x)).numpy()
    assert rel_err(run_ort(trained, x)[0], want) < 1e-4
    assert rel_err(run_ort(original, x)[0], want) > 1e-3  # the perturbation is visible


@pytest.mark.parametrize("opset", [9, 11, 13, 17, 21])
def test_opsets_9_to_21(opset):
    """One small conv net declared at each opset: loads, lifts, matches onnxruntime, writes back."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng()
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in [("w", (4, 3, 3, 3)), ("s", (4,)), ("b", (4,)), ("m", (4,)), ("fc", (5, 4)), ("fcb", (5,))]]
    inits.append(numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "v"))
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["p"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], name="fc", transB=1),  # opset 9 requires C
        helper.make_node("Softmax", ["y"], ["prob"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 5])], inits)
    model = load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))
    tg = lift(model).eval()
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        got = tg(torch.from_numpy(x)).numpy()
    assert rel_err(got, run_ort(model, x)[0]) < 1e-5
    assert set(tg.onnx_parameters()) == {"w", "s", "b", "fc", "fcb"} and set(tg.onnx_buffers()) == {"m", "v"}
    onnx.checker.check_model(write_back(model, tg), full_check=True)
