"""Residual branches PreCropping drops whole: which subgraphs count, the surgery, and when the plan drops them."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ctprune.errors import RatioError
from ctprune.pruning.precrop import apply_crop, channel_graph, plan_crop
from ctprune.pruning.precrop.branches import branches_to_drop, remove_branches, residual_branches
from ctprune.pruning.precrop.densities import layer_densities
from test_precrop_crop import conv_macs, conv_weight_count, masked_model, mute_branches, rel_err
from test_precrop_nets import as_ir3, densenet, mobilenet_v2, resnet, run, se_net, vgg

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def identity_adds(model: onnx.ModelProto) -> set[str]:
    """Adds one of whose inputs is also read by another node: the block input, i.e. an identity shortcut (the
    builders give projection shortcuts and plain chains no such fan-out into an Add)."""
    readers = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    return {n.name for n in model.graph.node if n.op_type == "Add" and any(readers[i] > 1 for i in n.input)}


def between(model: onnx.ModelProto, source: str, add: str) -> set[str]:
    """Nodes downstream of tensor `source` and upstream of node `add` (exclusive): the block's branch."""
    nodes = {n.name: n for n in model.graph.node}
    producer = {o: n.name for n in model.graph.node for o in n.output}
    down, frontier = set(), [source]
    while frontier:
        t = frontier.pop()
        for n in model.graph.node:
            if t in n.input and n.name not in down:
                down.add(n.name)
                frontier.extend(n.output)
    up, stack = set(), [producer[i] for i in nodes[add].input if i in producer]
    while stack:
        name = stack.pop()
        if name not in up:
            up.add(name)
            stack.extend(producer[i] for i in nodes[name].input if i in producer)
    return down & up


@pytest.mark.parametrize("build, count", [(resnet, 4), (lambda: resnet(blocks=(3, 3, 3)), 7), (mobilenet_v2, 4),
                                          (se_net, 1), (densenet, 0), (vgg, 0)])
def test_identity_shortcut_branches_found_and_nothing_else(build, count):
    model = build()
    branches = residual_branches(model)
    assert len(branches) == count
    assert {b.add for b in branches} == identity_adds(model)
    for b in branches:
        assert set(b.nodes) == between(model, b.stream, b.add)
        assert set(b.convs) == {n for n in b.nodes if n.startswith("conv")}


def muted(model: onnx.ModelProto, branches) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    mute_branches(out, branches)
    return out


@pytest.mark.parametrize("build", [resnet, mobilenet_v2, se_net, lambda: as_ir3(resnet())])
def test_removing_branches_equals_muting_them(build, rng):
    model = build()
    branches = residual_branches(model)
    subset = [b for b in branches if rng.random() < 0.6] or branches[:1]
    out = remove_branches(model, subset)
    onnx.checker.check_model(out, full_check=out.ir_version > 3)
    gone = {n for b in subset for n in b.nodes}
    assert not gone & {n.name for n in out.graph.node}
    assert {n.op_type for n in out.graph.node if n.name in {b.add for b in subset}} == {"Identity"}
    read = {i for n in out.graph.node for i in n.input}
    assert all(t.name in read for t in out.graph.initializer)  # no orphaned weights
    if out.ir_version <= 3:
        listed = {i.name for i in out.graph.input}
        assert {t.name for t in out.graph.initializer} <= listed and listed - {"input"} <= read
    x = rng.normal(size=(1, 3, 32, 32)).astype(np.float32)
    y = run(out, x)
    assert y.shape == (1, 10)
    assert rel_err(y, run(muted(model, subset), x)) < 1e-5
    assert rel_err(run(model, x), y) > 1e-3  # the branches did something


def _graph(nodes, inits, out_shape=(1, 4, 8, 8), extra_outputs=()):
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))]
        + [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in extra_outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _w(name, shape):
    return numpy_helper.from_array(np.ones(shape, np.float32), name)


def test_what_is_not_a_branch():
    conv = lambda i, o, n, k=3: helper.make_node("Conv", [i, f"{n}.w"], [o], name=n, pads=[k // 2] * 4)  # noqa: E731
    w = [_w("c1.w", (4, 4, 3, 3)), _w("c2.w", (4, 4, 3, 3))]
    ok = _graph([helper.make_node("Relu", ["x"], ["s"], name="r"), conv("s", "a", "c1"), conv("a", "b", "c2"),
                 helper.make_node("Add", ["b", "s"], ["y"], name="add")], w)
    assert [b.nodes for b in residual_branches(ok)] == [("c2", "c1")]
    # the branch also reads a tensor from before the shortcut
    two = _graph([helper.make_node("Relu", ["x"], ["s"], name="r"), conv("x", "a", "c1"), conv("a", "b", "c2"),
                  helper.make_node("Add", ["b", "s"], ["y"], name="add")], w)
    assert residual_branches(two) == []
    # an inner result is a graph output too
    leaky = _graph([helper.make_node("Relu", ["x"], ["s"], name="r"), conv("s", "a", "c1"), conv("a", "b", "c2"),
                    helper.make_node("Add", ["b", "s"], ["y"], name="add")], w, extra_outputs=["a"])
    assert residual_branches(leaky) == []
    # a broadcasting branch (per-channel): dropping it would change nothing's shape, but it is not a residual block
    pooled = _graph([helper.make_node("Relu", ["x"], ["s"], name="r"),
                     helper.make_node("GlobalAveragePool", ["s"], ["p"], name="gap"),
                     helper.make_node("Conv", ["p", "c1.w"], ["b"], name="c1", kernel_shape=[1, 1]),
                     helper.make_node("Add", ["s", "b"], ["y"], name="add")], [_w("c1.w", (4, 4, 1, 1))])
    assert residual_branches(pooled) == []
    # adding a constant, and a branch without any Conv
    const = _graph([helper.make_node("Add", ["x", "k"], ["y"], name="add")], [_w("k", (1, 4, 1, 1))])
    no_conv = _graph([helper.make_node("Relu", ["x"], ["s"], name="r"), helper.make_node("Sigmoid", ["s"], ["b"],
                                                                                          name="sig"),
                      helper.make_node("Add", ["b", "s"], ["y"], name="add")], [])
    assert residual_branches(const) == [] and residual_branches(no_conv) == []
    # duplicate node names: a branch could not be named unambiguously, so none is offered
    twin = _graph([helper.make_node("Relu", ["x"], ["s"], name="c1"), conv("s", "a", "c1"), conv("a", "b", "c2"),
                   helper.make_node("Add", ["b", "s"], ["y"], name="add")], w)
    assert residual_branches(twin) == []


def test_the_drop_rule_is_half_the_floor():
    # resnet()'s last block is 64 x 64 channels: at multiple 8 its inner group keeps 8/64 of its weights at least,
    # so the block goes when the densities ask for less than half of that.
    model = resnet()
    cg = channel_graph(model)
    convs = [l.name for l in cg.layers if l.op == "Conv"]
    last = next(b for b in residual_branches(model) if b.add == "add6")
    for density, expected in ((0.06, ["add6"]), (0.065, [])):
        densities = {c: density if c in last.convs else 0.25 for c in convs}
        assert [b.add for b in branches_to_drop(model, cg, densities, 4, 8)] == expected
    # ...and at multiple 4 the floor halves: 0.06 is then no longer below half of it
    densities = {c: 0.06 if c in last.convs else 0.25 for c in convs}
    assert branches_to_drop(model, cg, densities, 4, 4) == []


@pytest.mark.parametrize("build, pai, ratio", [(lambda: resnet(blocks=(3, 3, 3)), "synflow", 8),
                                               (lambda: resnet(blocks=(3, 3, 3)), "synflow", 4),
                                               (mobilenet_v2, "synflow", 4)])
def test_plan_drops_the_branches_the_scores_empty_and_still_meets_the_ratio(build, pai, ratio, rng):
    model = build()
    plan = plan_crop(model, ratio, pai=pai)
    assert plan.dropped, "SynFlow keeps almost nothing of some late blocks on these nets"
    cropped = apply_crop(model, plan)
    onnx.checker.check_model(cropped, full_check=True)
    achieved = conv_weight_count(model) / conv_weight_count(cropped)
    assert abs(achieved / ratio - 1) <= 0.05 and achieved == pytest.approx(plan.ratio_achieved, rel=1e-9)
    assert plan.conv_weights["before"] == conv_weight_count(model)
    rows = {r["name"]: r for r in plan.report_layers()}
    for b in plan.dropped:
        for c in b.convs:
            assert rows[c]["weights_after"] == 0 and rows[c]["out_channels"] == 0
            assert "dropped" in rows[c]["note"] and c not in {n.name for n in cropped.graph.node}
        # the scores asked for (almost) nothing of it
        asked = sum(rows[c]["density_target"] * rows[c]["weights_before"] for c in b.convs)
        assert asked < 0.1 * sum(rows[c]["weights_before"] for c in b.convs)
    assert plan.to_dict()["dropped_branches"] == [{"add": b.add, "convs": list(b.convs)} for b in plan.dropped]
    x = rng.normal(size=(1, 3, 32, 32)).astype(np.float32)
    assert rel_err(run(cropped, x), run(masked_model(model, plan), x)) < 1e-5


def test_drop_branches_off_and_shape_only_densities_never_drop():
    model = resnet(blocks=(3, 3, 3))
    kept = plan_crop(model, 8, pai="synflow", drop_branches=False)
    assert kept.dropped == [] and abs(kept.ratio_achieved / 8 - 1) <= 0.05
    for pai in ("uniform", "erk"):
        assert plan_crop(model, 8, pai=pai).dropped == []


def test_a_ratio_that_needs_whole_groups_gone_is_still_an_error():
    with pytest.raises(RatioError, match="cannot be reached by cropping channels"):
        plan_crop(resnet(), 1000, pai="synflow")


def test_the_macs_bounded_densities_crop_instead_of_dropping():
    # The MACs-bounded densities empty the last inverted residual here, but the MACs bound would then have to come
    # out of the early, MACs-heavy layers alone: synflow-macs crops that block instead.
    model = mobilenet_v2()
    cg = channel_graph(model)
    assert branches_to_drop(model, cg, layer_densities(model, cg, 4, "synflow-macs").by_layer, 4, 8)
    plan = plan_crop(model, 4, pai="synflow-macs")
    assert plan.dropped == [] and abs(plan.ratio_achieved / 4 - 1) <= 0.05
    cropped = apply_crop(model, plan)
    assert conv_macs(model) / conv_macs(cropped) >= plan.ratio_achieved


def test_dropping_never_overshoots_the_budget():
    # At a small ratio dropping a block alone would remove more than asked: the plan must not.
    model = resnet(blocks=(3, 3, 3))
    plan = plan_crop(model, 1.2, pai="synflow")
    assert abs(plan.ratio_achieved / 1.2 - 1) <= 0.05



@pytest.mark.parametrize("flag", ["--drop-branches", "--keep-branches"])
def test_cli_drops_branches_unless_told_to_keep_them(tmp_path, capsys, flag):
    from ctprune.cli import run as cli

    model = resnet(blocks=(3, 3, 3))
    path, out, report = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(model, path)
    code = cli([str(path), "--ratio", "4x", "--method", "precrop", "--pai", "synflow", "--epochs", "0", "-o", str(out),
                "--report", str(report), "--quiet", flag])
    assert code == 0, capsys.readouterr().err
    layers = json.loads(report.read_text())["layers"]
    dropped = {r["name"] for r in layers if r["weights_after"] == 0}
    remaining = {n.name for n in onnx.load(out).graph.node if n.op_type == "Conv"}
    if flag == "--drop-branches":
        assert dropped and not dropped & remaining
    else:
        assert not dropped
    assert remaining | dropped == {n.name for n in model.graph.node if n.op_type == "Conv"}
