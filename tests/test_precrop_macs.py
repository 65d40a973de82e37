"""`--pai synflow-macs`: the solver's MACs bound, so MACs (latency) shrink as much as weights (end to end on the four
test nets: test_precrop_crop.py, parametrized over pai)."""

from __future__ import annotations

import numpy as np
import pytest

from ctprune.pruning.precrop import channel_graph
from ctprune.pruning.precrop.solve import solve_keep_counts, weight_model
from test_precrop_nets import NetBuilder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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

