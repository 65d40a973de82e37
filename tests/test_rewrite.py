"""rewrite_model: masked 3x3 Convs -> PatternConv on a torch-exported ResNet-style net and on hand-built graphs.

The bar (contract.md): checker full_check passes, same graph inputs/outputs, outputs equal the masked dense model
within 1e-4 relative in plain onnxruntime (function inlined) and, when the kernel library is built, with it."""

import io
import secrets
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from ctprune.errors import GraphError
from ctprune.rewrite import LayerPatterns, rewrite_model
from ctprune.graph import weightless
from ctprune.lab.layer_model import random_layer_patterns
from conftest import kernel_library_or_none


class Block(nn.Module):
    def __init__(self, c, o, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o)
        self.c2, self.b2 = nn.Conv2d(o, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o)
        self.short = nn.Conv2d(c, o, 1, stride, bias=False) if stride != 1 or c != o else nn.Identity()

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(y)) + self.short(x))


class SmallResNet(nn.Module):
    """Relu6 stem (Clip with Constant bounds), two basic blocks (residual Adds, a stride-2 3x3, a 1x1 shortcut), a
    3x3 Conv read twice (no fusion), a head."""

    def __init__(self):
        super().__init__()
        self.stem, self.act = nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU6()
        self.l1, self.l2 = Block(8, 8, 1), Block(8, 16, 2)
        self.twice = nn.Conv2d(16, 16, 3, 1, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.l2(self.l1(self.act(self.stem(x))))
        t = self.twice(x)
        return self.fc((torch.relu(t) + t).mean((2, 3)))


@pytest.fixture(scope="module")
def resnet_onnx() -> onnx.ModelProto:
    torch.manual_seed(0)
    net = SmallResNet().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial BN, folded into the Convs by the exporter
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.uniform_(0.5, 1.5)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, torch.randn(1, 3, 12, 12), buffer, dynamo=False, opset_version=17,
            input_names=["image"], output_names=["logits"], dynamic_axes={"image": {0: "batch"}},
        )
    return onnx.load_from_string(buffer.getvalue())


def mask_3x3_convs(model, rng, kept_fraction=0.3, library_size=6):
    """A copy of `model` with every 3x3 Conv weight masked by random patterns, and the {conv name: LayerPatterns}."""
    masked = onnx.ModelProto()
    masked.CopyFrom(model)
    inits = {t.name: t for t in masked.graph.initializer}
    layers = {}
    for node in masked.graph.node:
        if node.op_type == "Conv" and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            if w.shape[2:] == (3, 3):
                patterns = random_layer_patterns(rng, w.shape[0], w.shape[1], kept_fraction, library_size, 1)
                inits[node.input[1]].CopyFrom(numpy_helper.from_array(w * patterns.mask(), node.input[1]))
                layers[node.name] = patterns
    return masked, layers


def run(model, feeds, library=False):
    if library:
        import ctprune

        return ctprune.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, feeds)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def rel_err(a, b) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def test_resnet_rewrite_keeps_graph_and_outputs(resnet_onnx):
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    masked, layers = mask_3x3_convs(resnet_onnx, rng)
    assert len(layers) == 6
    out = rewrite_model(masked, layers)
    onnx.checker.check_model(out, full_check=True)

    assert out.graph.input == masked.graph.input and out.graph.output == masked.graph.output
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("PatternConv") == 6 and ops.count("Conv") == 1  # the 1x1 shortcut stays
    assert [n.name for n in out.graph.node if n.op_type == "PatternConv"] == list(layers)
    # fused: stem's Relu6 (Clip), the two first-conv Relus, both blocks' residual Adds with the Relus after them
    # (l2's shortcut is a 1x1 Conv computed after c2: the fused node sits where the Add was); not fused: the Conv
    # read twice (relu(t) + t)
    assert ops.count("Relu") == 1 and ops.count("Clip") == 0 and ops.count("Add") == 1
    by_name = {n.name: n for n in out.graph.node}
    block_input = next(n for n in masked.graph.node if n.name == "/l1/c1/Conv").input[0]
    assert by_name["/l1/c2/Conv"].input[3] == block_input
    assert list(by_name["/l1/c2/Conv"].output) == [next(n.output[0] for n in masked.graph.node if n.name == "/l1/Relu_1")]
    shortcut = by_name["/l2/short/Conv"].output[0]
    assert by_name["/l2/c2/Conv"].input[3] == shortcut
    order = [n.name for n in out.graph.node]
    assert order.index("/l2/short/Conv") < order.index("/l2/c2/Conv")
    zero = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}[by_name["/stem/Conv"].input[3]]
    assert zero.shape == (1,) and zero[0] == 0  # nodes without a residual read a shared zero
    assert all(len(n.input) == 4 for n in out.graph.node if n.op_type == "PatternConv")
    attrs = {a.name: helper.get_attribute_value(a) for a in by_name["/stem/Conv"].attribute}
    assert (attrs["activation_min"], attrs["activation_max"]) == (0.0, 6.0)
    assert list(by_name["/stem/Conv"].output) == ["/act/Clip_output_0"]
    assert {a.name: helper.get_attribute_value(a) for a in by_name["/l2/c1/Conv"].attribute}["strides"] == [2, 2]
    twice = {a.name: helper.get_attribute_value(a) for a in by_name["/twice/Conv"].attribute}
    assert twice["activation_min"] == float("-inf") and twice["activation_max"] == float("inf")
    # dense weights and the fused Clip's Constant bounds are gone; compact weights hold 4 floats per kept kernel
    names = {t.name for t in out.graph.initializer}
    dense_names = {n.input[1] for n in masked.graph.node if n.name in layers}
    assert not names & dense_names
    assert not any(n.op_type == "Constant" for n in out.graph.node)
    kept = sum(p.kept_kernels() for p in layers.values())
    compact = [numpy_helper.to_array(t) for t in out.graph.initializer if t.name.endswith(".pattern")]
    assert sum(c.size for c in compact) == 4 * kept
    assert [(f.domain, f.name, list(f.input)) for f in out.functions] == [("ai.ctprune", "PatternConv", ["X", "W", "B", "Z"])]
    assert {(o.domain, o.version) for o in out.opset_import} == {("", 17), ("ai.ctprune", 1)}

    for batch in (1, 3):
        feeds = {"image": rng.standard_normal((batch, 3, 12, 12)).astype(np.float32)}
        want = run(masked, feeds)[0]
        got = run(out, feeds)[0]
        assert got.shape == want.shape == (batch, 10)
        assert rel_err(got, want) <= 1e-4, f"seed {seed}"
        if kernel_library_or_none():
            assert rel_err(run(out, feeds, library=True)[0], want) <= 1e-4, f"seed {seed}"


def test_input_model_is_not_modified(resnet_onnx):
    masked, layers = mask_3x3_convs(resnet_onnx, np.random.default_rng(secrets.randbits(32)))
    before = masked.SerializeToString()
    rewrite_model(masked, layers)
    assert masked.SerializeToString() == before


def test_unmasked_weights_are_refused_unless_asked(resnet_onnx):
    rng = np.random.default_rng(secrets.randbits(32))
    _, layers = mask_3x3_convs(resnet_onnx, rng)
    with pytest.raises(GraphError, match="outside the assigned patterns"):
        rewrite_model(resnet_onnx, layers)
    out = rewrite_model(resnet_onnx, layers, require_masked=False)  # masks on the way
    masked = onnx.ModelProto()
    masked.CopyFrom(resnet_onnx)
    inits = {t.name: t for t in masked.graph.initializer}
    for node in masked.graph.node:
        if node.name in layers:
            w = numpy_helper.to_array(inits[node.input[1]])
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(w * layers[node.name].mask(), node.input[1]))
    feeds = {"image": rng.standard_normal((2, 3, 12, 12)).astype(np.float32)}
    assert rel_err(run(out, feeds)[0], run(masked, feeds)[0]) <= 1e-4


def _ir3_model(rng, clip_bounds=(0.0, 6.0)):
    """Opset 9 / IR 3 like the onnx backend-test models: every initializer is also a graph input; Clip has attributes;
    conv_b shares its weight with a 3x3 Conv that is not rewritten; conv_c's weight is a Constant node."""
    wa = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    wb = rng.standard_normal((6, 6, 3, 3)).astype(np.float32)
    wc = rng.standard_normal((5, 6, 3, 3)).astype(np.float32)
    ba = rng.standard_normal(6).astype(np.float32)
    inits = [numpy_helper.from_array(wa, "wa"), numpy_helper.from_array(ba, "ba"), numpy_helper.from_array(wb, "wb")]
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Clip", ["a"], ["a_act"], name="clip_a", min=clip_bounds[0], max=clip_bounds[1]),
        helper.make_node("Conv", ["a_act", "wb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b"], ["b_act"], name="relu_b"),
        helper.make_node("Conv", ["b_act", "wb"], ["b2"], name="conv_b_shared", pads=[1, 1, 1, 1]),
        helper.make_node("Constant", [], ["wc"], name="wc_const", value=numpy_helper.from_array(wc)),
        helper.make_node("Conv", ["b2", "wc"], ["y"], name="conv_c", strides=[2, 2]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 9, 9])]
    inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "ir3", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    return model


@pytest.mark.parametrize("detach_above", [1024, 0], ids=["small-weights-inline", "all-weights-detached"])
def test_ir3_opset9_model_is_upgraded_and_cleaned(detach_above, monkeypatch):
    # the opset upgrade runs with large weights detached (graph/weightless.py); 0 detaches every one of them
    monkeypatch.setattr(weightless, "DETACH_MIN_ELEMENTS", detach_above)
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    model = _ir3_model(rng)
    onnx.checker.check_model(model)
    layers = {}
    weights = {"wa": (6, 4), "wb": (6, 6), "wc": (5, 6)}
    for name, w in (("conv_a", "wa"), ("conv_b", "wb"), ("conv_c", "wc")):
        layers[name] = random_layer_patterns(rng, *weights[w], 0.5, 4, 1)
    # mask the dense weights in place: conv_b's mask also applies to the shared Conv, which stays a Conv
    for t in model.graph.initializer:
        if t.name == "wa":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * layers["conv_a"].mask(), "wa"))
        if t.name == "wb":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * layers["conv_b"].mask(), "wb"))
    const = model.graph.node[5].attribute[0]
    const.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(const.t) * layers["conv_c"].mask()))

    out = rewrite_model(model, layers)
    onnx.checker.check_model(out, full_check=True)
    assert out.ir_version >= 8 and {(o.domain, o.version) for o in out.opset_import} == {("", 13), ("ai.ctprune", 1)}
    ops = {n.name: n.op_type for n in out.graph.node}
    assert ops["conv_a"] == ops["conv_b"] == ops["conv_c"] == "PatternConv" and ops["conv_b_shared"] == "Conv"
    assert "clip_a" not in ops and "relu_b" not in ops and "wc_const" not in ops
    initializers = {t.name for t in out.graph.initializer}
    graph_inputs = {i.name for i in out.graph.input}
    assert "wa" not in initializers and "wa" not in graph_inputs  # IR-3 graph input removed with its initializer
    assert "wb" in initializers  # still read by conv_b_shared
    assert "ba" in initializers  # the bias is reused as it is
    # IR 3 listed initializers as inputs only because it had to; at IR >= 4 they would be overridable inputs
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["y"]

    x = rng.standard_normal((2, 4, 9, 9)).astype(np.float32)
    want = run(model, {"x": x})[0]
    assert rel_err(run(out, {"x": x})[0], want) <= 1e-4, f"seed {seed}"
    if kernel_library_or_none():
        assert rel_err(run(out, {"x": x}, library=True)[0], want) <= 1e-4, f"seed {seed}"


def test_layers_can_be_keyed_by_output_name_for_unnamed_nodes():
    rng = np.random.default_rng(secrets.randbits(32))
    model = _ir3_model(rng)
    for node in model.graph.node:
        node.name = ""
    patterns = random_layer_patterns(rng, 5, 6, 0.5, 4)
    out = rewrite_model(model, {"y": patterns}, require_masked=False)
    assert [n.op_type for n in out.graph.node].count("PatternConv") == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: None, "no Conv node named 'nope'"),
        (lambda m: m.graph.node[1].CopyFrom(helper.make_node("Relu", ["a"], ["a_act"], name="nope")), "not a Conv"),
        (lambda m: m.graph.node[2].attribute.append(helper.make_attribute("dilations", [2, 2])), "dilations"),
        (lambda m: m.graph.node[2].attribute.append(helper.make_attribute("auto_pad", "SAME_UPPER")), "auto_pad"),
    ],
)
def test_malformed_requests_raise_graph_errors(change, message):
    rng = np.random.default_rng(0)
    model = _ir3_model(rng)
    change(model)
    name = "conv_b" if message in ("dilations", "auto_pad") else "nope"
    if message in ("dilations", "auto_pad"):
        model.graph.node[2].attribute.remove(next(a for a in model.graph.node[2].attribute if a.name == "pads"))
    with pytest.raises(GraphError, match=message):
        rewrite_model(model, {name: random_layer_patterns(rng, 6, 6, 0.5, 4)}, require_masked=False)


def test_non_3x3_and_grouped_convs_are_refused():
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w1")
    wg = numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "wg")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["a"], name="pointwise"),
         helper.make_node("Conv", ["a", "wg"], ["y"], name="grouped", group=2, pads=[1, 1, 1, 1])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])], [w1, wg],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(GraphError, match="'pointwise'.*3x3|not 3x3|\\(O, C, 3, 3\\)"):
        rewrite_model(model, {"pointwise": LayerPatterns(np.array([[0, 1, 2, 3]]), np.zeros((4, 4), int))})
    with pytest.raises(GraphError, match="group 2"):
        rewrite_model(model, {"grouped": LayerPatterns(np.array([[0, 1, 2, 3]]), np.zeros((4, 2), int))})


def _residual_graph(rng):
    """x (N, 4, 6, 6) and r (N, 4, 6, 6) graph inputs; four 3x3 Convs a..d on x:
    a + r -> Relu (fuses Add and Relu);  b + bias (1, 4, 1, 1) (a per-channel constant: folds into b's bias);
    c + d (two Convs into one Add: c fuses it with d's output as Z, d stays plain);  e = a's block output + r, read by
    a graph output and a Relu (Add fuses, the Relu cannot: the sum is read twice)."""
    def conv(name, inp, out):
        w = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
        return helper.make_node("Conv", [inp, f"{name}.w"], [out], name=name, pads=[1, 1, 1, 1]), \
            numpy_helper.from_array(w, f"{name}.w")
    nodes, inits = [], []
    for name, inp in (("a", "x"), ("b", "x"), ("c", "x"), ("d", "x"), ("e", "ya")):
        node, init = conv(name, inp, f"{name}.out")
        nodes.append(node), inits.append(init)
    inits.append(numpy_helper.from_array(rng.standard_normal((1, 4, 1, 1)).astype(np.float32), "bias"))
    nodes += [
        helper.make_node("Add", ["a.out", "r"], ["a.sum"], name="add_a"),
        helper.make_node("Relu", ["a.sum"], ["ya"], name="relu_a"),
        helper.make_node("Add", ["b.out", "bias"], ["yb"], name="add_b"),
        helper.make_node("Add", ["c.out", "d.out"], ["ycd"], name="add_cd"),
        helper.make_node("Add", ["r", "e.out"], ["ye"], name="add_e"),
        helper.make_node("Relu", ["ye"], ["ye_relu"], name="relu_e"),
    ]
    # nodes are listed with the Convs first; the Adds after: a valid topological order
    nodes = nodes[:4] + nodes[5:7] + [nodes[4]] + nodes[7:]
    io = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 4, 6, 6])
    graph = helper.make_graph(nodes, "residuals", [io("x"), io("r")], [io(n) for n in ("yb", "ycd", "ye", "ye_relu")],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_residual_adds_fuse_only_where_the_shapes_and_readers_allow():
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    model = _residual_graph(rng)
    onnx.checker.check_model(model, full_check=True)
    masked, layers = mask_3x3_convs(model, rng, kept_fraction=0.5)
    assert sorted(layers) == ["a", "b", "c", "d", "e"]
    out = rewrite_model(masked, layers)
    onnx.checker.check_model(out, full_check=True)
    by_name = {n.name: n for n in out.graph.node}
    assert [n.name for n in out.graph.node if n.op_type == "Add"] == []
    assert list(by_name["b"].output) == ["yb"] and by_name["b"].input[2]  # the constant Add became b's bias
    assert [n.name for n in out.graph.node if n.op_type == "Relu"] == ["relu_e"]
    assert by_name["a"].input[3] == "r" and list(by_name["a"].output) == ["ya"]
    assert by_name["c"].input[3] == "d.out" and list(by_name["c"].output) == ["ycd"]
    assert by_name["e"].input[3] == "r" and list(by_name["e"].output) == ["ye"]
    attrs = {a.name: helper.get_attribute_value(a) for a in by_name["a"].attribute}
    assert (attrs["activation_min"], attrs["activation_max"]) == (0.0, float("inf"))
    attrs = {a.name: helper.get_attribute_value(a) for a in by_name["e"].attribute}
    assert attrs["activation_max"] == float("inf") and attrs["activation_min"] == float("-inf")
    zero = by_name["b"].input[3]
    assert by_name["d"].input[3] == zero and by_name["d"].input[2] == ""  # no bias: an empty slot before Z
    for batch in (1, 2):
        feeds = {n: rng.standard_normal((batch, 4, 6, 6)).astype(np.float32) for n in ("x", "r")}
        want = run(masked, feeds)
        for library in (False, True) if kernel_library_or_none() else (False,):
            got = run(out, feeds, library=library)
            for g, w in zip(got, want):
                assert g.shape == w.shape and rel_err(g, w) <= 1e-4, f"seed {seed}, library {library}"


def test_batchnorm_after_a_conv_is_folded_and_then_its_residual_and_relu_fuse():
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    io = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 4, 6, 6])
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), f"{c}.w") for c in "ab"]
    inits.append(numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b.bias"))
    for c in "ab":  # gamma, beta, mean, var
        inits += [numpy_helper.from_array(v.astype(np.float32), f"{c}.{n}") for n, v in
                  (("g", rng.uniform(0.5, 1.5, 4)), ("beta", rng.standard_normal(4)), ("m", rng.standard_normal(4)),
                   ("v", rng.uniform(0.5, 2.0, 4)))]
    bn = lambda c, inp, out: helper.make_node("BatchNormalization", [inp, f"{c}.g", f"{c}.beta", f"{c}.m", f"{c}.v"],
                                              [out], name=f"bn_{c}", epsilon=1e-3)
    nodes = [helper.make_node("Conv", ["x", "a.w"], ["a.out"], name="a", pads=[1, 1, 1, 1]), bn("a", "a.out", "a.bn"),
             helper.make_node("Sum", ["a.bn", "r"], ["a.sum"], name="sum_a"),
             helper.make_node("Relu", ["a.sum"], ["ya"], name="relu_a"),
             helper.make_node("Conv", ["ya", "b.w", "b.bias"], ["b.out"], name="b", pads=[1, 1, 1, 1]),
             bn("b", "b.out", "b.bn"), helper.make_node("Relu", ["b.bn"], ["yb"], name="relu_b")]
    model = helper.make_model(helper.make_graph(nodes, "bn", [io("x"), io("r")], [io("yb")], inits),
                              opset_imports=[helper.make_opsetid("", 13)])
    masked, layers = mask_3x3_convs(model, rng, kept_fraction=0.5)
    out = rewrite_model(masked, layers)
    onnx.checker.check_model(out, full_check=True)
    assert [n.op_type for n in out.graph.node] == ["PatternConv", "PatternConv"]
    a, b = out.graph.node
    assert a.input[3] == "r" and list(a.output) == ["ya"] and list(b.output) == ["yb"]
    assert not {t.name for t in out.graph.initializer} & {"b.bias", "a.g", "a.v", "b.m"}  # folded away
    for batch in (1, 2):
        feeds = {n: rng.standard_normal((batch, 4, 6, 6)).astype(np.float32) for n in ("x", "r")}
        want = run(masked, feeds)[0]
        for library in (False, True) if kernel_library_or_none() else (False,):
            assert rel_err(run(out, feeds, library=library)[0], want) <= 1e-4, f"seed {seed}, library {library}"


def test_a_shared_zero_residual_only_when_a_node_lacks_its_z():
    """The function's residual form needs a Z on every node of the op: those without one read a shared zero, and
    none is added when every node has its own (ResNet shortcuts whose Add fused into them; onnxruntime warned of the
    unread initializer)."""
    from ctprune.ops.names import DOMAIN
    from ctprune.rewrite.model import Z_INPUT, _give_every_node_a_residual

    z = Z_INPUT["SparseConv"]

    def graph(with_z):
        nodes = [helper.make_node("SparseConv", [f"x{i}"] + [f"w{i}_{k}" for k in range(z - 1)] + ([f"z{i}"] if has else []),
                                  [f"y{i}"], domain=DOMAIN) for i, has in enumerate(with_z)]
        return helper.make_graph(nodes, "g", [], [])

    both = graph([True, True])
    _give_every_node_a_residual(both, "zero", "SparseConv")
    assert len(both.initializer) == 0 and [n.input[z] for n in both.node] == ["z0", "z1"]
    one = graph([True, False])
    _give_every_node_a_residual(one, "zero", "SparseConv")
    assert [t.name for t in one.initializer] == ["zero"]
    assert [n.input[z] for n in one.node] == ["z0", "zero"] and all(len(n.input) == z + 1 for n in one.node)
