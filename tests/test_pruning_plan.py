"""PruningPlan: masks, LayerPatterns for the rewriter, the report's numbers, JSON round trip."""

import json

import numpy as np
import pytest
import torch

from ctprune.pruning import PruningPlan, one_shot_plan
from ctprune.rewrite.pattern_conv import compact_from_dense, dense_from_compact


@pytest.fixture
def weights():
    g = torch.Generator().manual_seed(11)
    return {
        "conv_a": torch.nn.Parameter(torch.randn(24, 16, 3, 3, generator=g)),
        "conv_b": torch.nn.Parameter(torch.randn(32, 24, 3, 3, generator=g)),
    }


def test_layer_patterns_agree_with_masks_and_the_rewriter(weights):
    dense = {n: w.detach().clone() for n, w in weights.items()}
    plan = one_shot_plan(weights, ratio=6.0, patterns=8)
    masks = plan.masks()
    lps = plan.layer_patterns()
    assert set(lps) == set(weights)
    for name, lp in lps.items():
        assert lp.library.shape[1] == 4 and lp.assignment.shape == weights[name].shape[:2]
        assert np.array_equal(lp.mask(), masks[name].numpy())
        # the weights were masked in place: exactly the kept taps are left (random weights are nonzero)
        assert torch.equal(weights[name].detach(), dense[name] * masks[name])
        compact = compact_from_dense(weights[name].detach().numpy(), lp, where=name)
        assert np.array_equal(dense_from_compact(compact), weights[name].detach().numpy())
        assert compact.weights.size == plan.layers[name].weights_after
        # each layer's library is cut to the patterns it uses
        assert len(lp.library) == len(np.unique(lp.assignment[lp.assignment >= 0]))


def test_report_numbers(weights):
    plan = one_shot_plan(weights, ratio=6.0, patterns=8)
    rows = plan.layer_report()
    totals = plan.totals()
    assert [r["name"] for r in rows] == ["conv_a", "conv_b"]
    assert totals["conv_weights"]["before"] == sum(r["weights_before"] for r in rows) == 24 * 16 * 9 + 32 * 24 * 9
    nonzero = sum(int((w != 0).sum()) for w in weights.values())
    assert totals["conv_weights"]["after"] == sum(r["weights_after"] for r in rows) == nonzero
    assert totals["ratio_achieved"] == pytest.approx(6.0, rel=0.01)
    assert totals["importance"] == "magnitude"
    for r in rows:
        assert r["weights_after"] == 4 * round(r["kept_kernel_fraction"] * r["in_channels"] * r["out_channels"])
        assert 1 <= r["pattern_count"] <= 8


def test_json_round_trip(weights):
    plan = one_shot_plan(weights, ratio=4.0, patterns=4, apply=False)
    plan.skipped["conv0"] = "first Conv of the network, kept dense for accuracy"
    back = PruningPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back.library.to_list() == plan.library.to_list()
    assert back.skipped == plan.skipped and back.ratio_target == plan.ratio_target
    for name in plan.layers:
        assert np.array_equal(back.layers[name].assignment, plan.layers[name].assignment)
        assert torch.equal(back.layer_mask(name), plan.layer_mask(name))
    assert back.totals() == plan.totals()
