"""`--pai synflow-macs`: SynFlow densities solved under a MACs bound, so MACs (latency) shrink as much as weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from ctprune.graph.layers import conv_layers
from ctprune.pruning.precrop import apply_crop, channel_graph, plan_crop
from ctprune.pruning.precrop.solve import solve_keep_counts, weight_model
from test_precrop_crop import masked_model, rel_err
from test_precrop_nets import NetBuilder, densenet, mobilenet_v2, resnet, run, se_net

NETS = {"resnet": resnet, "mobilenet_v2": mobilenet_v2, "densenet": densenet, "se_net": se_net}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def conv_totals(model: onnx.ModelProto) -> tuple[int, int]:
    """(conv weights, conv MACs per sample), counted from the model's own shapes, not from the plan."""
    layers = conv_layers(model)
    weights = sum(c.out_channels * (c.in_channels // c.group) * int(np.prod(c.kernel_shape)) for c in layers)
    return weights, sum(c.macs for c in layers)


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("ratio", [2, 4])
def test_macs_shrink_at_least_as_much_as_weights(name, ratio):
    model = NETS[name](seed=ratio)
    plan = plan_crop(model, ratio, pai="synflow-macs")
    cropped = apply_crop(model, plan)
    onnx.checker.check_model(cropped, full_check=True)
    (w0, m0), (w1, m1) = conv_totals(model), conv_totals(cropped)
    assert abs((w0 / w1) / ratio - 1) <= 0.05, w0 / w1
    assert m0 / m1 >= w0 / w1, (m0 / m1, w0 / w1)
    x = np.random.default_rng(ratio).normal(size=(1, 3, 32, 32)).astype(np.float32)
    y = run(cropped, x)
    assert y.shape == (1, 10)
    assert rel_err(y, run(masked_model(model, plan), x)) < 1e-5


def strided_chain():
    """Four convs, each halving the resolution: the first has 64x the MACs per weight of the last."""
    b = NetBuilder(seed=0, size=64)
    x = "input"
    for w in (32, 64, 64, 64):
        x = b.relu(b.conv(x, w, stride=2))
    b.head(x)
    return b.model()


def test_bound_changes_a_dense_early_allocation():
    cg = channel_graph(strided_chain())
    wm = weight_model(cg)
    full = wm.weights(wm.sizes)
    spatial = {"conv1": 32 * 32, "conv2": 16 * 16, "conv3": 8 * 8, "conv4": 4 * 4}
    assert [l.name for l in wm.layers] == list(spatial)
    # what SynFlow tends to give: early layers dense, late ones sparse
    densities = {"conv1": 1.0, "conv2": 0.6, "conv3": 0.3, "conv4": 0.15}

    def ratios(counts):
        k = np.array([counts[key] for key in wm.keys], dtype=float)
        sp = np.array([spatial[l.name] for l in wm.layers])
        w = wm.weights(k)
        return full.sum() / w.sum(), (full * sp).sum() / (w * sp).sum()

    free_w, free_m = ratios(solve_keep_counts(cg, densities, 3.0))
    bound_w, bound_m = ratios(solve_keep_counts(cg, densities, 3.0, macs_per_weight=spatial))
    assert free_m < free_w  # without the bound MACs shrink less than weights...
    assert bound_m >= bound_w  # ...with it, at least as much
    assert abs(bound_w / 3.0 - 1) <= 0.05

