"""Channel groups and the joint keep-count solver, checked on graphs whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from ctprune.errors import RatioError
from ctprune.pruning.precrop import channel_graph
from ctprune.pruning.precrop.solve import allowed_counts, solve_keep_counts, weight_model
from test_precrop_nets import NetBuilder, densenet, mobilenet_v2, resnet, se_net, vgg


def group_of(cg, layer_name, side="out"):
    layer = next(l for l in cg.layers if l.name == layer_name)
    layout = layer.out_layout if side == "out" else layer.in_layout
    return {cg.space_group[s] for s, _ in layout.segments}


def test_residual_adds_tie_a_stage_into_one_group():
    cg = channel_graph(resnet(blocks=(2, 2)))
    # stem conv1 and the second conv of both first-stage blocks feed the same residual stream
    assert group_of(cg, "conv1") == group_of(cg, "conv3") == group_of(cg, "conv5")
    assert group_of(cg, "conv2") != group_of(cg, "conv1")  # inside a block: free
    assert group_of(cg, "conv7") == group_of(cg, "conv8") == group_of(cg, "conv10")  # stage 2 + its downsample


def test_depthwise_ties_its_input_and_output():
    cg = channel_graph(mobilenet_v2())
    dw = [l for l in cg.layers if l.depthwise]
    assert dw
    for layer in dw:
        assert layer.in_layout == layer.out_layout


def test_concat_lays_groups_side_by_side():
    cg = channel_graph(densenet(layers=(2,)))
    after_two = next(l for l in cg.layers if l.name == "fc")  # reads concat(concat(stem, g1), g2) via BN, GAP
    assert [n for _, n in after_two.in_layout.segments] == [32, 16, 16]
    assert len({cg.space_group[s] for s, _ in after_two.in_layout.segments}) == 3


def test_squeeze_excite_mul_ties_expand_conv_to_the_block():
    cg = channel_graph(se_net(blocks=1))
    assert group_of(cg, "conv3") == group_of(cg, "conv5")  # block conv × sigmoid(expand conv)
    assert not cg.groups[next(iter(group_of(cg, "conv4")))].frozen  # the SE bottleneck is croppable


def test_flatten_gives_gemm_blocks_and_graph_io_is_frozen():
    cg = channel_graph(vgg())
    fc1 = next(l for l in cg.layers if l.op == "Gemm" and l.weight == "fc1.weight")
    assert fc1.in_layout.block == 16 and fc1.in_layout.channels == 32
    fc2 = next(l for l in cg.layers if l.name == "fc2")
    assert cg.group_of(fc2.out_layout.segments[0][0]).frozen.startswith("graph output")
    first = cg.layers[0]
    assert "graph input" in cg.group_of(first.in_layout.segments[0][0]).frozen


def test_allowed_counts():
    assert allowed_counts(20, 8, False).tolist() == [8, 16, 20]
    assert allowed_counts(6, 8, False).tolist() == [6]
    assert allowed_counts(64, 8, True).tolist() == [64]


def chain(widths=(64, 64, 64, 64)):
    b = NetBuilder(seed=0)
    x = "input"
    for w in widths:
        x = b.relu(b.conv(x, w))
    b.head(x)
    return b.model()


def layer_log_error(cg, densities, counts):
    wm = weight_model(cg)
    k = np.array([counts[key] for key in wm.keys], dtype=float)
    full = wm.weights(wm.sizes)
    w = wm.weights(k)
    d = np.array([densities[l.name] for l in wm.layers])
    return float(np.mean((np.log(w / full) - np.log(d)) ** 2)), full.sum() / w.sum()


def test_joint_solve_fits_unequal_densities_better_than_sqrt():
    model = chain()
    cg = channel_graph(model)
    # conv1 reads the 3-channel image; then dense, sparse, dense, sparse: sqrt(d) per layer cannot fit both sides
    densities = {"conv1": 0.5, "conv2": 0.125, "conv3": 0.5, "conv4": 0.0625}
    wm = weight_model(cg)
    total = wm.weights(wm.sizes)
    ratio = total.sum() / sum(densities[l.name] * t for l, t in zip(wm.layers, total))
    joint = solve_keep_counts(cg, densities, ratio, multiple=8)
    err_joint, achieved = layer_log_error(cg, densities, joint)
    assert abs(achieved / ratio - 1) <= 0.05
    # the naive answer: each conv's output group keeps sqrt(its density), rounded to 8
    naive = {}
    for layer in wm.layers:
        key = cg.space_group[layer.out_layout.segments[0][0]]
        size = cg.groups[key].size
        naive[key] = size if cg.groups[key].frozen else max(8, int(round(size * np.sqrt(densities[layer.name]) / 8)) * 8)
    for key, group in cg.groups.items():
        naive.setdefault(key, group.size)
    err_naive, _ = layer_log_error(cg, densities, naive)
    assert err_joint < err_naive


def test_solver_respects_the_channel_multiple_and_budget():
    cg = channel_graph(chain((40, 48, 56, 64)))
    counts = solve_keep_counts(cg, {}, 3.0, multiple=16)
    for key, k in counts.items():
        assert k == cg.groups[key].size or k % 16 == 0
    with pytest.raises(RatioError, match="largest reachable ratio"):
        solve_keep_counts(cg, {}, 500.0, multiple=16)


def test_plan_summary_is_json_ready():
    import json

    from ctprune.pruning.precrop import plan_crop

    plan = plan_crop(se_net(blocks=1), 2, pai="erk")
    summary = json.loads(json.dumps(plan.to_dict()))
    assert summary["ratio_achieved"] == pytest.approx(plan.ratio_achieved)
    assert summary["conv_weights"]["before"] / summary["conv_weights"]["after"] == pytest.approx(plan.ratio_achieved)
    assert any(g["frozen"] for g in summary["groups"]) and any(not g["frozen"] for g in summary["groups"])
    assert all(0 < row["density_achieved"] <= 1 for row in summary["layers"])
