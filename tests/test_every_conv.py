"""--method auto: every Conv and FC layer pruned under one ratio; 1x1/kxk/FC layers become SparseConv, with their
BatchNormalization, activation (Relu6, HardSwish, x * Sigmoid(x)) and residual Add fused; outputs equal the masked dense
model's, through the model-local functions and through ctprune's kernels."""

from __future__ import annotations

import math
import secrets

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import ctprune
from conftest import rel_err, run_ort
from ctprune.errors import RatioError
from ctprune.pruning import ClickTrainPruner
from ctprune.pruning.layers import SparseTarget
from ctprune.rewrite.sparse_conv import ACTIVATION_HARDSIGMOID_MUL
from graph_nets import export

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _check_equal(result, batch=3, seed=None):
    seed = secrets.randbits(32) if seed is None else seed
    shape = [d.dim_value or batch for d in result.model.graph.input[0].type.tensor_type.shape.dim]
    shape[0] = batch
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    want = run_ort(result.masked_dense, x)[0]
    assert rel_err(run_ort(result.model, x)[0], want) < 1e-4, f"functions, seed {seed}"
    sess = ctprune.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert rel_err(got, want) < 1e-4, f"kernels, seed {seed}"


@pytest.mark.parametrize("keep_bn", [False, True], ids=["bn-folded", "bn-nodes"])
def test_mobilenetv2_auto_prunes_every_pointwise_conv(keep_bn):
    model = export("mobilenetv2", "torchscript17", keep_bn=keep_bn)
    result = ctprune.prune(model, ratio=4, epochs=0, seed=1, prune_head=True)
    report = result.report
    assert report["ratio_achieved"] == pytest.approx(4.0, rel=0.02)
    forms = {l["name"]: l["form"] for l in report["layers"]}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    depthwise = {n.name for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)}
    first = convs[0].name
    for node in convs:  # every non-depthwise Conv but the first is pruned; the others are listed with a reason
        if node.name in depthwise or node.name == first:
            assert node.name in {d["name"] for d in report["dense_layers"]}
        else:
            assert forms[node.name] in ("sparse", "dense-kept")
    assert any(l.get("kind") == "fc" for l in report["layers"])  # --prune-head: the classifier is pruned too
    ops = [n.op_type for n in result.model.graph.node]
    assert "SparseConv" in ops
    if keep_bn:  # BN after every pointwise Conv folds into its SparseConv
        assert ops.count("BatchNormalization") < [n.op_type for n in model.graph.node].count("BatchNormalization")
    assert "HardSwish" not in ops or forms.get(convs[-1].name) == "dense-kept"
    onnx.checker.check_model(result.model, full_check=True)
    _check_equal(result)
    # the report's MACs after pruning count the kept weights of every rewritten layer (shapes behind ctprune's ops
    # included): the masked dense model's nonzero weights times output pixels, plus block padding at most
    nonzero = nonzero_macs(result.masked_dense)
    assert nonzero <= report["macs"]["after"] <= 1.15 * nonzero, (report["macs"], nonzero)


def nonzero_macs(model: onnx.ModelProto) -> int:
    """Multiply-adds per sample of a standard-ONNX model's Conv and Gemm/MatMul layers, counting nonzero weights."""
    from ctprune.graph.layers import shaped_model
    from ctprune.graph.shapes import shape_table

    m = shaped_model(model)
    shapes, weights = shape_table(m), {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    total = 0
    for node in m.graph.node:
        w = weights.get(node.input[1]) if len(node.input) > 1 else None
        if w is None or node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        pixels = math.prod(shapes[node.output[0]][2:]) if node.op_type == "Conv" else 1
        total += int(np.count_nonzero(w)) * pixels
    return total


def _gated_model(rng):
    """1x1 Conv -> x * Sigmoid(x) -> 1x1 Conv (+ residual Add) -> Relu -> GAP -> Flatten -> MatMul -> Gemm (head)."""
    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.3
    inits = [numpy_helper.from_array(v, n) for n, v in [
        ("stem", w(16, 3, 3, 3)), ("w1", w(32, 16, 1, 1)), ("b1", w(32)), ("w2", w(16, 32, 1, 1)),
        ("fc1", w(16, 24)), ("fc2", w(10, 24)), ("fc2b", w(10))]]
    nodes = [
        helper.make_node("Conv", ["x", "stem"], ["s"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["s", "w1", "b1"], ["a"], name="expand"),
        helper.make_node("Sigmoid", ["a"], ["g"], name="gate"),
        helper.make_node("Mul", ["a", "g"], ["h"], name="silu"),
        helper.make_node("Conv", ["h", "w2"], ["p"], name="project"),
        helper.make_node("Add", ["p", "s"], ["r"], name="residual"),
        helper.make_node("Relu", ["r"], ["q"], name="relu"),
        helper.make_node("GlobalAveragePool", ["q"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "fc1"], ["m"], name="hidden"),
        helper.make_node("Gemm", ["m", "fc2", "fc2b"], ["y"], name="head", transB=1),
    ]
    graph = helper.make_graph(nodes, "gated", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_gates_residual_and_fc_layers_fuse_and_match():
    seed = secrets.randbits(32)
    model = _gated_model(np.random.default_rng(seed))
    result = ctprune.prune(model, ratio=3, epochs=0, seed=2)
    nodes = {n.name: n for n in result.model.graph.node}
    forms = {l["name"]: l["form"] for l in result.report["layers"]}
    assert set(forms) == {"expand", "project", "hidden"}, forms  # the stem and the head stay dense
    assert {d["name"] for d in result.report["dense_layers"]} == {"stem", "head"}
    if forms["expand"] == "sparse":  # x * Sigmoid(x) folded in: the gate nodes are gone
        assert "gate" not in nodes and "silu" not in nodes and nodes["expand"].output[0] == "h"
    if forms["project"] == "sparse":  # the residual Add and the Relu are the SparseConv's
        assert "residual" not in nodes and "relu" not in nodes and nodes["project"].output[0] == "q"
    _check_equal(result, seed=seed)


def test_one_budget_over_mixed_layers_is_block_structured():
    torch.manual_seed(0)
    weights = {"c3": torch.nn.Parameter(torch.randn(32, 16, 3, 3)), "pw": torch.nn.Parameter(torch.randn(64, 32, 1, 1)),
               "fc": torch.nn.Parameter(torch.randn(96, 100))}
    sparse = {"pw": SparseTarget(4), "fc": SparseTarget(8, transposed=True, kind="fc")}
    plan = ClickTrainPruner(weights, ratio=8, sparse=sparse, allocation="balanced",
                            macs={"c3": 32 * 16 * 9 * 196, "pw": 64 * 32 * 196, "fc": 9600}, costs={"fc": 16.0}).prune_now()
    assert plan.ratio_achieved == pytest.approx(8.0, rel=0.01)
    assert set(plan.totals()["by_form"]) == {"pattern 3x3", "sparse conv", "sparse fc"}
    pw = plan.layer_mask("pw").reshape(16, 4, 32)
    assert (pw == pw[:, :1]).all() and pw.any(-1).all()  # blocks of 4 share a pattern; no output channel dies
    fc = plan.layer_mask("fc").t()[:96].reshape(12, 8, 96)  # stored (I, O): blocks of 8 of the 100 outputs
    assert (fc == fc[:, :1]).all()
    assert (weights["pw"] == 0).float().mean() > 0.5  # hard masks applied to the weights
    from ctprune.pruning.plan import PruningPlan
    assert PruningPlan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()


def test_unreachable_ratio_names_the_largest_over_every_form():
    weights = {"c3": torch.nn.Parameter(torch.randn(8, 8, 3, 3)), "pw": torch.nn.Parameter(torch.randn(8, 8, 1, 1))}
    largest = (8 * 8 * 9 + 64) / (8 * 4 + 8)
    with pytest.raises(RatioError, match=f"largest reachable ratio over these 2 layers is {int(largest * 100) / 100:g}x"):
        ClickTrainPruner(weights, ratio=largest * 1.1, sparse={"pw": SparseTarget(4)})


def test_both_crops_then_prunes_every_form():
    model = export("mobilenetv2", "torchscript17", keep_bn=False)
    result = ctprune.prune(model, ratio=6, epochs=0, seed=3, method="both", channel_multiple=4)
    report = result.report
    # the ratio is over the original model's prunable weights: cropping and pruning multiply to it
    before = sum(l["weights_before"] for l in ctprune.prune(model, ratio=6, epochs=0, seed=3).report["layers"])
    assert report["conv_weights"]["before"] == before
    assert report["ratio_achieved"] == pytest.approx(6.0, rel=0.05)
    assert any("channels cropped" in n for n in report["notes"])
    assert report["params"]["after"] < report["params"]["before"] / 2  # depthwise, stem and head stay dense
    _check_equal(result)


def test_budget_is_not_spent_above_a_layers_break_even_density():
    torch.manual_seed(1)
    weights = {"a": torch.nn.Parameter(torch.randn(64, 64, 1, 1)), "b": torch.nn.Parameter(torch.randn(64, 64, 1, 1))}
    sparse = {"a": SparseTarget(4), "b": SparseTarget(4)}
    with torch.no_grad():  # "b" keeps its importance in a few input channels: uncapped, "a" takes most of the budget
        weights["b"].mul_(0.01)[:, :4] += 1.0
    free = ClickTrainPruner({n: torch.nn.Parameter(w.detach().clone()) for n, w in weights.items()}, ratio=4,
                            sparse=sparse).prune_now()
    capped = ClickTrainPruner({n: torch.nn.Parameter(w.detach().clone()) for n, w in weights.items()}, ratio=4,
                              sparse=sparse, max_density={"a": 0.3}).prune_now()
    density = {n: l.weights_after / l.weights_before for n, l in capped.sparse.items()}
    assert free.sparse["a"].weights_after / 4096 > 0.3 + 0.05
    assert density["a"] <= 0.3 + 4 / 4096 and capped.ratio_achieved == pytest.approx(4.0, rel=0.01)
    # a cap the budget cannot live with is lifted, not obeyed by pruning past the ratio asked
    tight = ClickTrainPruner({n: torch.nn.Parameter(w.detach().clone()) for n, w in weights.items()}, ratio=2,
                             sparse=sparse, max_density={"a": 0.2, "b": 0.2}).prune_now()
    assert tight.ratio_achieved == pytest.approx(2.0, rel=0.01)


def test_layers_kept_dense_store_only_their_kept_weights():
    """A sparse layer the cost model keeps as a dense op (too small to gain) holds its kept weights compactly in the
    file; onnxruntime folds them back into the dense weight when the session loads."""
    import onnxruntime as ort

    model = _gated_model(np.random.default_rng(7))
    result = ctprune.prune(model, ratio=8, epochs=0, seed=2)
    from ctprune.rewrite.model import COMPACT_HOLD_DENSITY

    kept = [l["name"] for l in result.report["layers"] if l["form"] == "dense-kept"
            and l["weights_after"] / l["weights_before"] < COMPACT_HOLD_DENSITY]
    assert kept, "the tiny layers of this net are expected to stay dense"
    nodes = {n.name: n for n in result.model.graph.node}
    producers = {o: n for n in result.model.graph.node for o in n.output}
    inits = {t.name: t for t in result.model.graph.initializer}
    rows = {l["name"]: l for l in result.report["layers"]}
    for name in kept:
        rebuilt = producers[nodes[name].input[1]]
        scatter = producers[rebuilt.input[0]]
        assert rebuilt.op_type == "Reshape" and scatter.op_type == "ScatterElements"
        assert np.prod(inits[scatter.input[2]].dims) == rows[name]["weights_after"]  # the kept weights, no more
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(__import__("tempfile").mkdtemp()) + "/opt.onnx"
    ort.InferenceSession(result.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    prelude = {producers[nodes[name].input[1]].name for name in kept}
    assert not prelude & {n.name for n in onnx.load(so.optimized_model_filepath).graph.node}  # folded at load
    _check_equal(result)


def _written_out_hardswish_model(rng, divisor: float):
    """1x1 -> x * Clip(x + 3, 0, 6) / divisor -> depthwise 3x3 -> the same -> 1x1 -> GAP -> head (paddle2onnx's
    HardSwish when divisor == 6)."""
    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.3
    inits = [numpy_helper.from_array(v, n) for n, v in [
        ("stem", w(32, 3, 3, 3)), ("w1", w(64, 32, 1, 1)), ("b1", w(64)), ("dw", w(64, 1, 3, 3)), ("bdw", w(64)),
        ("w2", w(32, 64, 1, 1)), ("fc", w(10, 32)),
        ("three", np.array(3, np.float32)), ("zero", np.array(0, np.float32)), ("six", np.array(6, np.float32)),
        ("d", np.array(divisor, np.float32))]]
    nodes = [helper.make_node("Conv", ["x", "stem"], ["s"], name="stem", pads=[1, 1, 1, 1])]

    def hardswish(x, tag):
        nodes.extend([helper.make_node("Add", [x, "three"], [f"{tag}_a"], name=f"{tag}_add"),
                      helper.make_node("Clip", [f"{tag}_a", "zero", "six"], [f"{tag}_c"], name=f"{tag}_clip"),
                      helper.make_node("Mul", [x, f"{tag}_c"], [f"{tag}_m"], name=f"{tag}_mul"),
                      helper.make_node("Div", [f"{tag}_m", "d"], [f"{tag}_y"], name=f"{tag}_div")])
        return f"{tag}_y"

    nodes.append(helper.make_node("Conv", ["s", "w1", "b1"], ["e"], name="expand"))
    h = hardswish("e", "hs1")
    nodes.append(helper.make_node("Conv", [h, "dw", "bdw"], ["t"], name="depthwise", group=64, pads=[1, 1, 1, 1]))
    h = hardswish("t", "hs2")
    nodes += [helper.make_node("Conv", [h, "w2"], ["p"], name="project"),
              helper.make_node("GlobalAveragePool", ["p"], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "fc"], ["y"], name="head", transB=1)]
    graph = helper.make_graph(nodes, "hardswish", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 28, 28])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("divisor", [6.0, 5.0], ids=["hardswish", "not-hardswish"])
def test_written_out_hardswish_fuses_and_the_depthwise_conv_between_moves(divisor):
    seed = secrets.randbits(32)
    model = _written_out_hardswish_model(np.random.default_rng(seed), divisor)
    result = ctprune.prune(model, ratio=8, epochs=0, seed=2)
    forms = {l["name"]: l["form"] for l in result.report["layers"]}
    assert forms == {"expand": "sparse", "project": "sparse"}, forms
    nodes = {n.name: n for n in result.model.graph.node}
    gates = {f"{tag}_{op}" for tag in ("hs1", "hs2") for op in ("add", "clip", "mul", "div")}
    if divisor == 6.0:  # x * Clip(x + 3, 0, 6) / 6 is x * HardSigmoid(x; 1/6, 1/2): folded into both SparseConvs
        assert not gates & set(nodes), sorted(gates & set(nodes))
        assert nodes["expand"].output[0] == "hs1_y" and nodes["depthwise"].output[0] == "hs2_y"
        assert nodes["depthwise"].op_type == "SparseConv"  # SparseConvs on both sides now
        for name in ("expand", "depthwise"):
            acts = {a.name: helper.get_attribute_value(a) for a in nodes[name].attribute}
            assert acts["activation"] == ACTIVATION_HARDSIGMOID_MUL
            assert acts["activation_alpha"] == pytest.approx(1 / 6) and acts["activation_beta"] == pytest.approx(0.5)
    else:  # Clip's bound 6 and the divisor 5 differ: not a HardSwish, nothing fuses
        assert gates <= set(nodes)
    _check_equal(result, seed=seed)


def test_report_notes_when_multiply_adds_fall_much_less_than_weights():
    from ctprune.report.build import allocation_note
    from test_pruning_blocks import EXAMPLE_VGG

    # VGG-19's shape at 8x: small 3x3 layers with most of the multiply-adds kept at 3.7x, huge FC layers cut 10x
    rows = [{"macs_before": 19_000_000, "macs_after": 5_100_000}, {"macs_before": 120_000, "macs_after": 12_000}]
    note = allocation_note(rows, 8.0, "balanced")
    assert note is not None and "3.74x for 8.00x fewer weights" in note and "--allocation macs" in note
    assert allocation_note(rows, 8.0, "macs") is None  # it already spends the budget by multiply-adds
    assert allocation_note(rows, 6.0, "balanced") is None  # 3.74x >= 0.6 * 6
    assert allocation_note([{"macs_before": 0, "macs_after": 0}], 8.0, "balanced") is None
    # a run whose multiply-adds fell with its weights says nothing of the kind
    report = ctprune.prune(str(EXAMPLE_VGG), ratio=8, epochs=0, seed=0).report
    assert not any("--allocation macs" in n for n in report["notes"]), report["notes"]
