"""Depthwise Convs beside ctprune's ops become SparseConvs keeping every weight (rewrite/depthwise.py): which ones
move, that the model computes the same through the kernels and the functions, that onnxruntime then inserts no
NCHWc reorders around them, and what the report says."""

from __future__ import annotations

import secrets

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ctprune
from conftest import rel_err, run_ort
from ctprune.lab.ort_layout import optimised_ops
from ctprune.pruning.plan import SparseLayer
from ctprune.runtime import cpu
from ctprune.rewrite import rewrite_model
from ctprune.rewrite.depthwise import MIN_OUTPUT_WIDTH, REASON
from ctprune.rewrite.sparse_conv import CompactSparseWeights
from graph_nets import export

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Convs:
    """Nodes and initializers of a test graph of Convs (He-scaled random weights) and Clip(0, 6)s."""

    def __init__(self, rng):
        self.rng, self.nodes = rng, []
        self.inits = [numpy_helper.from_array(np.array(0, np.float32), "lo"),
                      numpy_helper.from_array(np.array(6, np.float32), "hi")]

    def conv(self, name, x, y, shape, bias=False, **attrs):
        w = (self.rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
        self.inits.append(numpy_helper.from_array(w, f"{name}.w"))
        inputs = [x, f"{name}.w"]
        if bias:
            b = self.rng.standard_normal(shape[0]).astype(np.float32)
            self.inits.append(numpy_helper.from_array(b, f"{name}.b"))
            inputs.append(f"{name}.b")
        self.nodes.append(helper.make_node("Conv", inputs, [y], name=name, **attrs))

    def clip(self, x, y):
        self.nodes.append(helper.make_node("Clip", [x, "lo", "hi"], [y], name=f"clip_{y}"))


def _chain(rng) -> onnx.ModelProto:
    """A -> Clip -> D1 (dw 3x3) -> Clip -> B -> D2 (dw, dilation 2) -> C -> D3 (dw 5x5, stride 2) -> Relu."""
    g = _Convs(rng)
    nodes, inits, clip = g.nodes, g.inits, g.clip

    def conv(name, x, y, shape, **attrs):
        g.conv(name, x, y, shape, bias=True, **attrs)

    conv("A", "X", "a", (64, 32, 1, 1))
    clip("a", "a6")
    conv("D1", "a6", "d1", (64, 1, 3, 3), group=64, pads=[1, 1, 1, 1])
    clip("d1", "d16")
    conv("B", "d16", "b", (32, 64, 1, 1))
    conv("D2", "b", "d2", (32, 1, 3, 3), group=32, pads=[2, 2, 2, 2], dilations=[2, 2])
    conv("C", "d2", "c", (32, 32, 1, 1))
    conv("D3", "c", "d3", (32, 1, 5, 5), group=32, pads=[2, 2, 2, 2], strides=[2, 2])
    nodes.append(helper.make_node("Relu", ["d3"], ["Y"], name="relu"))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 32, 15, 15])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 32, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _pruned_1x1(model, names, rng, density=0.0625) -> tuple[dict, onnx.ModelProto]:
    """{name: block-1 SparseLayer keeping `density` of the weights} for the 1x1 layers `names`, and the model with
    those weights masked."""
    masked = onnx.ModelProto()
    masked.CopyFrom(model)
    layers = {}
    for name in names:
        tensor = next(t for t in masked.graph.initializer if t.name == f"{name}.w")
        w = numpy_helper.to_array(tensor)
        keep = rng.random(w.shape[:2]) < density
        keep[:, 0] = True  # no empty output channel
        tensor.CopyFrom(numpy_helper.from_array((w * keep[:, :, None, None]).astype(np.float32), tensor.name))
        layers[name] = SparseLayer(weight_shape=w.shape, block=1, transposed=False, keep=keep, out_channels=w.shape[0])
    return layers, masked


def _ops_by_name(model) -> dict[str, str]:
    return {n.name: n.op_type for n in model.graph.node}


def test_only_depthwise_convs_between_ctprune_ops_on_the_fast_path_move():
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    model = _chain(rng)
    # density 1/32 (with each output channel's forced first input, ~1/16): at 1/16 (~3/32) the cost model kept one
    # of these small layers dense in 3 of 40 draws on a Zen 4, and the test is about the depthwise Convs
    layers, masked = _pruned_1x1(model, "ABC", rng, density=1 / 32)
    moved: dict[str, str] = {}
    out = rewrite_model(masked, {}, sparse=layers, depthwise=moved)
    ops = _ops_by_name(out)
    assert [ops[n] for n in "ABC"] == ["SparseConv"] * 3, f"the 1x1 layers must be SparseConvs (seed {seed})"
    # D1: A (through a Clip) before, B (through a Clip) after: moves, its Clip fused in; D2 sits between B and C but is
    # dilated (no depthwise path); D3 reads C but the graph's output follows: one reorder either way, stays
    assert moved == {"D1": REASON}
    assert ops["D1"] == "SparseConv" and ops["D2"] == "Conv" and ops["D3"] == "Conv"
    assert "clip_d16" not in ops
    d1 = next(n for n in out.graph.node if n.name == "D1")
    assert {a.name: helper.get_attribute_value(a) for a in d1.attribute}["group"] == 64
    x = np.random.default_rng(seed).standard_normal((1, 32, 15, 15)).astype(np.float32)
    want = run_ort(masked, x)[0]
    assert rel_err(run_ort(out, x)[0], want) < 1e-5, f"functions, seed {seed}"
    sess = ctprune.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    assert rel_err(sess.run(None, {"X": x})[0], want) < 1e-5, f"kernels, seed {seed}"


def test_nothing_moves_without_ctprune_ops_on_both_sides_or_when_not_asked():
    rng = np.random.default_rng(0)
    model = _chain(rng)
    moved: dict[str, str] = {}
    out = rewrite_model(model, {}, sparse={}, depthwise=moved)
    assert moved == {} and all(op == "Conv" for name, op in _ops_by_name(out).items() if name[0] in "ABCD")
    layers, masked = _pruned_1x1(model, "B", rng)  # D1 reads the dense A
    out = rewrite_model(masked, {}, sparse=layers, depthwise=moved)
    assert moved == {} and _ops_by_name(out)["D1"] == "Conv"
    layers, masked = _pruned_1x1(model, "AB", rng)
    out = rewrite_model(masked, {}, sparse=layers)  # depthwise=None: the rewrite leaves them alone
    assert _ops_by_name(out)["D1"] == "Conv"


def test_a_moved_depthwise_conv_keeps_every_weight_exactly():
    rng = np.random.default_rng(1)
    model = _chain(rng)
    weights = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    weights["D1.w"][3, 0, 1, 1] = 0.0  # an exact zero stays a stored weight: nothing of a depthwise Conv is pruned
    model.graph.initializer[[t.name for t in model.graph.initializer].index("D1.w")].CopyFrom(
        numpy_helper.from_array(weights["D1.w"], "D1.w"))
    layers, masked = _pruned_1x1(model, "AB", rng)
    out = rewrite_model(masked, {}, sparse=layers, depthwise={})
    d1 = next(n for n in out.graph.node if n.name == "D1")
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in d1.attribute}
    compact = CompactSparseWeights(values=inits[d1.input[1]], columns=inits[d1.input[2]], pointer=inits[d1.input[3]],
                                   block_order=np.array(attrs["block_order"]), weight_shape=tuple(attrs["weight_shape"]),
                                   block=attrs["block"], group=attrs["group"])
    assert compact.kept == weights["D1.w"].size
    np.testing.assert_array_equal(compact.dense(), weights["D1.w"])


@pytest.mark.parametrize("keep_bn", [False, True], ids=["bn-folded", "bn-nodes"])
def test_pruned_mobilenet_runs_without_layout_reorders(tmp_path, keep_bn, monkeypatch):
    # the AVX2 rule (every width moves; on AVX-512 only 3x3 ones and wide enough others: the test below)
    monkeypatch.setattr(cpu, "kernel_tier", lambda: "avx2")
    model = export("mobilenetv2", "torchscript17", keep_bn=keep_bn)
    result = ctprune.prune(model, ratio=4, epochs=0, seed=1)
    depthwise = [n.name for n in model.graph.node
                 if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    ops = _ops_by_name(result.model)
    assert depthwise and all(ops[name] == "SparseConv" for name in depthwise)
    reasons = {d["name"]: d["reason"] for d in result.report["dense_layers"]}
    assert all("runs as SparseConv" in reasons[name] for name in depthwise)  # still listed as dense, and why
    assert any("NCHWc layout reorders" in note for note in result.report["notes"])
    seed = secrets.randbits(32)
    x = np.random.default_rng(seed).standard_normal((3, 3, 32, 32)).astype(np.float32)
    want = run_ort(result.masked_dense, x)[0]
    assert rel_err(run_ort(result.model, x)[0], want) < 1e-4, f"functions, seed {seed}"
    sess = ctprune.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert rel_err(sess.run(None, {sess.get_inputs()[0].name: x})[0], want) < 1e-4, f"kernels, seed {seed}"
    path = tmp_path / "pruned.onnx"
    onnx.save(result.model, path)
    optimised = optimised_ops(str(path))
    # only the stem (an onnxruntime Conv in NCHWc) hands over to ctprune's ops: one reorder in all
    assert optimised["com.microsoft.nchwc.ReorderInput"] + optimised["com.microsoft.nchwc.ReorderOutput"] <= 1, optimised


def _widths_chain(rng, hw: int, weights_as_inputs: bool = False, k: int = 3) -> onnx.ModelProto:
    """A (1x1) -> Clip -> D (dw kxk, stride 1) -> Clip -> B (1x1) -> D2 (dw kxk, stride 2) -> Clip -> C (1x1), on an
    hw x hw input: D's output is hw wide, D2's about hw / 2. weights_as_inputs: every initializer also a graph input
    (overridable, as IR < 4 exporters wrote them)."""
    g = _Convs(rng)
    nodes, inits, conv, clip = g.nodes, g.inits, g.conv, g.clip
    conv("A", "X", "a", (128, 64, 1, 1))
    clip("a", "a6")
    conv("D", "a6", "d", (128, 1, k, k), group=128, pads=[k // 2] * 4)
    clip("d", "d6")
    conv("B", "d6", "b", (128, 128, 1, 1))
    conv("D2", "b", "d2", (128, 1, k, k), group=128, pads=[k // 2] * 4, strides=[2, 2])
    clip("d2", "d26")
    conv("C", "d26", "Y", (64, 128, 1, 1))
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 64, hw, hw])]
    if weights_as_inputs:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "widths", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("hw, weights_as_inputs, tier, k, moves", [
    (28, False, "avx512", 5, {"D", "D2"}),  # D 28 wide and D2 14 wide both move
    (14, False, "avx512", 5, {"D"}),       # D 14 wide moves, D2 (7 wide) stays with onnxruntime's NCHWc kernel
    (10, False, "avx512", 5, set()),       # neither is wide enough
    (10, True, "avx512", 5, {"D", "D2"}),  # weights that are graph inputs: onnxruntime runs no NCHWc, both move
    (10, False, "avx2", 5, {"D", "D2"}),   # AVX2: every width moves
    (10, False, "avx512", 3, {"D", "D2"}),  # 3x3: rows of at most one vector have their own kernel, every width moves
])
def test_on_avx512_only_wide_enough_depthwise_convs_move(monkeypatch, tmp_path, hw, weights_as_inputs, tier, k,
                                                         moves):
    assert MIN_OUTPUT_WIDTH["avx512"] == 14
    monkeypatch.setattr(cpu, "kernel_tier", lambda: tier)
    rng = np.random.default_rng()
    model = _widths_chain(rng, hw, weights_as_inputs, k)
    layers, masked = _pruned_1x1(model, "ABC", rng, density=0.03)
    moved: dict[str, str] = {}
    out = rewrite_model(masked, {}, sparse=layers, depthwise=moved)
    ops = _ops_by_name(out)
    assert [ops[n] for n in "ABC"] == ["SparseConv"] * 3, "the 1x1 layers at density 1/32 must be SparseConvs"
    assert set(moved) == moves
    assert {n for n in ("D", "D2") if ops[n] == "SparseConv"} == moves
    # the premise: onnxruntime runs the dense model's Convs in NCHWc only when their weights are constants
    path = tmp_path / "masked.onnx"
    onnx.save(masked, path)
    nchwc = sum(count for op, count in optimised_ops(str(path)).items() if op.startswith("com.microsoft.nchwc."))
    assert (nchwc == 0) == weights_as_inputs, optimised_ops(str(path))
    x = rng.standard_normal((1, 64, hw, hw)).astype(np.float32)
    want = run_ort(masked, x)[0]
    sess = ctprune.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    assert rel_err(sess.run(None, {"X": x})[0], want) < 1e-5
