"""PreCropping end to end on small nets: achieved ratios, exact outputs against the masked dense model, pitfalls."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from ctprune.errors import GraphError, RatioError
from ctprune.graph.layers import conv_layers
from ctprune.pruning.precrop import apply_crop, channel_graph, plan_crop
from ctprune.pruning.precrop.crop import crop_model
from test_precrop_nets import NetBuilder, as_ir3, densenet, mobilenet_v2, resnet, run, se_net, vgg

NETS = {"resnet": resnet, "mobilenet_v2": mobilenet_v2, "densenet": densenet, "se_net": se_net, "vgg": vgg}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def conv_weight_count(model: onnx.ModelProto) -> int:
    """Conv weights counted from the model itself (not from the plan)."""
    inits = {t.name: t for t in model.graph.initializer}
    return sum(int(np.prod(inits[n.input[1]].dims)) for n in model.graph.node if n.op_type == "Conv")


def conv_macs(model: onnx.ModelProto) -> int:
    """Conv multiply-adds per sample, from the model's own shapes (not from the plan)."""
    return sum(c.macs for c in conv_layers(model))


def masked_model(model: onnx.ModelProto, plan) -> onnx.ModelProto:
    """The dense model with every input weight that reads a cropped channel set to zero, and every residual branch
    the plan dropped multiplied by zero before its Add (the branch's nodes all stay and run)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    mute_branches(out, plan.dropped)
    inits = {t.name: t for t in out.graph.initializer}
    alias = {n.output[0]: n.input[0] for n in out.graph.node if n.op_type == "Identity"}
    nodes = {n.name: n for n in out.graph.node}
    cg = plan.channels
    for layer in cg.layers:
        if layer.op == "Conv" and (layer.depthwise or layer.group > 1):
            continue
        node = nodes[layer.name]
        axis = 1 if layer.op == "Conv" or any(a.name == "transB" and a.i for a in node.attribute) else 0
        source = layer.weight
        while source in alias:
            source = alias[source]
        w = numpy_helper.to_array(inits[source]).copy()
        kept = cg.kept_features(layer.in_layout, plan.keep)
        dropped = np.setdiff1d(np.arange(w.shape[axis]), kept)
        index = [slice(None)] * w.ndim
        index[axis] = dropped
        w[tuple(index)] = 0
        # a private copy per layer: a shared weight may be masked differently by each reader
        out.graph.initializer.append(numpy_helper.from_array(w, f"{layer.name}.masked_weight"))
        node.input[1] = f"{layer.name}.masked_weight"
        if any(i.name == source for i in out.graph.input):  # IR 3 style: initializers listed as inputs
            out.graph.input.append(helper.make_tensor_value_info(f"{layer.name}.masked_weight", 1, list(w.shape)))
    read = {i for n in out.graph.node for i in n.input}
    unread = [t for t in out.graph.initializer if t.name not in read]
    for t in unread:  # an IR-3 model may not keep initializers that are neither read nor listed as inputs
        out.graph.initializer.remove(t)
        for i in [i for i in out.graph.input if i.name == t.name]:
            out.graph.input.remove(i)
    return out


def mute_branches(model: onnx.ModelProto, branches) -> None:
    """In place: every branch's result multiplied by zero before its Add, Add(branch, stream) -> Add(branch * 0,
    stream); the branch's nodes all stay and run."""
    if not branches:
        return
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), "masked.zero"))
    adds = {b.add: b.stream for b in branches}
    nodes = []
    for node in model.graph.node:
        if node.name in adds:
            slot = 0 if node.input[1] == adds[node.name] else 1
            nodes.append(helper.make_node("Mul", [node.input[slot], "masked.zero"], [f"{node.name}.muted"]))
            node.input[slot] = f"{node.name}.muted"
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def inputs(seed=0, n=1):
    return np.random.default_rng(seed).normal(size=(n, 3, 32, 32)).astype(np.float32)


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2", "densenet", "se_net"])
@pytest.mark.parametrize("ratio", [2, 4])
@pytest.mark.parametrize("pai", ["synflow", "synflow-macs"])
def test_ratio_within_5_percent_and_outputs_match_masked_model(name, ratio, pai):
    model = NETS[name](seed=ratio)
    plan = plan_crop(model, ratio, pai=pai)
    cropped = apply_crop(model, plan)
    onnx.checker.check_model(cropped, full_check=True)
    achieved = conv_weight_count(model) / conv_weight_count(cropped)
    assert abs(achieved / ratio - 1) <= 0.05, achieved
    assert achieved == pytest.approx(plan.ratio_achieved, rel=1e-9)
    if pai == "synflow-macs":  # the MACs bound: MACs (latency) shrink at least as much as weights
        macs_ratio = conv_macs(model) / conv_macs(cropped)
        assert macs_ratio >= achieved, (macs_ratio, achieved)
    x = inputs(seed=ratio)
    y_crop, y_masked = run(cropped, x), run(masked_model(model, plan), x)
    assert y_crop.shape == (1, 10)
    assert rel_err(y_crop, y_masked) < 1e-5
    # cropping did something the masked model's zeros can't hide: the dense output differs
    assert rel_err(run(model, x), y_masked) > 1e-3


@pytest.mark.parametrize("name", sorted(NETS))
def test_keeping_every_channel_reproduces_outputs_exactly(name):
    model = NETS[name]()
    cg = channel_graph(model)
    keep = {k: np.arange(g.size) for k, g in cg.groups.items()}
    same = crop_model(model, keep, cg)
    x = inputs(seed=7)
    assert np.array_equal(run(same, x), run(model, x))


def test_graph_inputs_and_outputs_are_never_cropped():
    model = resnet()
    cropped = apply_crop(model, plan_crop(model, 4, pai="uniform"))
    assert [str(i) for i in cropped.graph.input] == [str(i) for i in model.graph.input]
    assert [str(o) for o in cropped.graph.output] == [str(o) for o in model.graph.output]
    first = next(n for n in cropped.graph.node if n.op_type == "Conv")
    w = next(t for t in cropped.graph.initializer if t.name == first.input[1])
    assert w.dims[1] == 3  # the image's channels stay


def test_ir3_graph_inputs_follow_new_shapes():
    for build in (resnet, mobilenet_v2, vgg):
        model = as_ir3(build())
        plan = plan_crop(model, 4, pai="erk")
        cropped = apply_crop(model, plan)
        onnx.checker.check_model(cropped)
        inits = {t.name: list(t.dims) for t in cropped.graph.initializer}
        listed = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in cropped.graph.input}
        assert set(inits) <= set(listed)
        assert all(listed[n] == dims for n, dims in inits.items())
        x = inputs(seed=3)
        assert rel_err(run(cropped, x), run(masked_model(model, plan), x)) < 1e-5


def test_shared_initializers_are_copied_before_slicing():
    b = NetBuilder(seed=5)
    x = b.cbr("input", 32)
    left = b.conv(x, 32, bias=False)
    right = b.conv(x, 16, k=1, bias=False)
    # One zero bias for two convs with different channel groups, and one weight read by two convs.
    shared = b.const("shared_zero_bias", np.zeros(32))
    for node in b.nodes:
        if node.name == left:
            node.input.append(shared)
    twin = b.op("Conv", [x, left + ".weight", shared], kernel_shape=[3, 3], pads=[1] * 4)
    b.channels[twin] = 32
    # exporters also read deduplicated weights through Identity nodes
    alias = b.op("Identity", [shared])
    third = b.op("Conv", [b.relu(twin), b.op("Identity", [left + ".weight"]), alias], kernel_shape=[3, 3], pads=[1] * 4)
    b.channels[third] = 32
    mixed = b.relu(b.op("Add", [left, third]))
    out = b.op("Concat", [mixed, b.relu(right)], axis=1)
    b.channels[out] = 48
    b.head(out)
    model = b.model()
    plan = plan_crop(model, 2, pai="erk")
    cropped = apply_crop(model, plan)
    onnx.checker.check_model(cropped, full_check=True)
    x = inputs(seed=5)
    assert rel_err(run(cropped, x), run(masked_model(model, plan), x)) < 1e-5
    # the shared bias and shared weight now exist in as many shapes as their readers need
    names = [t.name for t in cropped.graph.initializer]
    assert any(n.startswith("shared_zero_bias") for n in names)


def test_depthwise_group_attribute_follows_channels():
    model = mobilenet_v2()
    cropped = apply_crop(model, plan_crop(model, 4, pai="uniform"))
    inits = {t.name: list(t.dims) for t in cropped.graph.initializer}
    depthwise = [n for n in cropped.graph.node if n.op_type == "Conv"
                 and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert depthwise
    for node in depthwise:
        group = next(a.i for a in node.attribute if a.name == "group")
        assert inits[node.input[1]][0] == group and inits[node.input[1]][1] == 1


def test_vgg_flatten_gemm_rows_are_cropped_in_blocks():
    model = vgg()
    plan = plan_crop(model, 4, pai="erk")
    cropped = apply_crop(model, plan)
    fc1 = next(t for t in cropped.graph.initializer if t.name == "fc1.weight")
    last = plan.channels.layers[2]  # the last conv
    kept = len(plan.keep[plan.channels.space_group[last.out_layout.segments[0][0]]])
    assert fc1.dims[1] == kept * 16  # 4x4 spatial positions per channel
    x = inputs(seed=9)
    assert rel_err(run(cropped, x), run(masked_model(model, plan), x)) < 1e-5


def test_channel_multiple_rounding():
    model = resnet(width=32)
    plan = plan_crop(model, 4, pai="uniform", channel_multiple=8)
    for key, group in plan.groups.items():
        kept = len(plan.keep[key])
        assert kept == group.size or kept % 8 == 0
    for row in plan.report_layers():
        assert set(row) >= {"name", "op", "in_channels", "out_channels", "density_target", "density_achieved"}


def test_unreachable_ratio_names_a_group():
    model = resnet()
    with pytest.raises(RatioError, match=r"largest reachable ratio is [0-9.]+x.*channel group"):
        plan_crop(model, 1000, pai="uniform")
    with pytest.raises(RatioError):
        plan_crop(model, 1.0, pai="uniform")
    with pytest.raises(RatioError, match="unknown PAI method"):
        plan_crop(model, 2, pai="magic")


def test_ties_that_do_not_line_up_name_the_nodes():
    b = NetBuilder(seed=2)
    x = b.cbr("input", 32)
    a, c = b.conv(x, 16), b.conv(x, 16)
    cat = b.op("Concat", [a, c], axis=1)
    b.channels[cat] = 32
    whole = b.conv(x, 32)
    bad = b.op("Add", [cat, whole])
    b.channels[bad] = 32
    b.head(bad)
    with pytest.raises(GraphError, match="add1.*do not line up"):
        plan_crop(b.model(), 2, pai="uniform")


def test_pretrained_keeps_the_strongest_channels():
    b = NetBuilder(seed=4)
    x = b.cbr("input", 32)
    y = b.relu(b.conv(x, 32))
    b.head(y)
    model = b.model()
    # make channels 0..7 of conv2's output the only strong ones
    for t in model.graph.initializer:
        if t.name == "conv2.weight":
            w = numpy_helper.to_array(t).copy()
            w[8:] *= 1e-3
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    plan = plan_crop(model, 1.6, pai="uniform", channel_multiple=8)
    key = plan.channels.space_group[plan.channels.layers[1].out_layout.segments[0][0]]
    if len(plan.keep[key]) < 32:
        assert set(range(8)) <= set(plan.keep[key].tolist())
    scratch = plan_crop(model, 1.6, pai="uniform", pretrained=False)
    assert all(np.array_equal(v, np.arange(len(v))) for v in scratch.keep.values())
