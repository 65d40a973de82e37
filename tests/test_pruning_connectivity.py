"""Connectivity pruning: the global ratio, per-layer bounds, unreachable ratios."""

import math

import numpy as np
import pytest
import torch

from ctprune.errors import RatioError
from ctprune.pruning.connectivity import (
    ALLOCATIONS,
    allocate_kernels,
    keep_bounds,
    kernel_budget,
    kernel_costs,
    largest_ratio,
)
from ctprune.pruning.selection import select_plan

# A small ResNet-like stack of 3x3 convs (O, C): widths 16 -> 32 -> 64.
NET = {"s1a": (16, 16), "s1b": (16, 16), "s2a": (32, 16), "s2b": (32, 32), "s3a": (64, 32), "s3b": (64, 64)}


def random_scores(seed, shapes=NET):
    g = torch.Generator().manual_seed(seed)
    # heavy-tailed like real Taylor scores, with a different scale per layer
    return {n: torch.rand(o, c, generator=g).pow(4) * 10 ** (i - 3) for i, (n, (o, c)) in enumerate(shapes.items())}


def ratio_of(keep, shapes=NET):
    before = sum(9 * o * c for o, c in shapes.values())
    return before / (4 * sum(int(k.sum()) for k in keep.values()))


@pytest.mark.parametrize("ratio", [2.25, 3.0, 4.0, 8.0, 12.0, 16.0])
def test_global_ratio_is_met_within_one_percent(ratio):
    keep = allocate_kernels(random_scores(int(ratio * 10)), ratio)
    assert ratio_of(keep) == pytest.approx(ratio, rel=0.01)
    for name, k in keep.items():
        assert k.shape == NET[name]
        assert k.any(dim=1).all(), f"{name}: a filter lost every kernel"


def test_layer_bounds_hold_and_follow_the_scores():
    shapes = {"even": (32, 32), "peaked": (32, 32)}
    g = torch.Generator().manual_seed(0)
    even = torch.rand(32, 32, generator=g) + 1.0
    peaked = torch.rand(32, 32, generator=g) * 0.01
    peaked[:, :4] += 10.0  # importance concentrated in few kernels: cheap to prune the rest
    keep = allocate_kernels({"even": even, "peaked": peaked}, 8.0, spread=2.5)
    frac = {n: k.float().mean().item() for n, k in keep.items()}
    assert frac["even"] > frac["peaked"]
    bounds = keep_bounds(shapes, kernel_budget(shapes, 8.0), 2.5)
    for n, k in keep.items():
        lo, hi = bounds[n]
        assert lo <= int(k.sum()) <= hi
    # the concentrated layer keeps exactly its important kernels first
    assert keep["peaked"][:, :4].all()


def test_kept_kernels_are_the_best_scored_within_a_layer():
    scores = random_scores(5)
    keep = allocate_kernels(scores, 6.0)
    for name, k in keep.items():
        s = scores[name]
        # beyond each filter's best kernel (always kept), no removed kernel outscores a kept one
        best = torch.zeros_like(k)
        best[torch.arange(k.shape[0]), s.argmax(dim=1)] = True
        extra_kept = s[k & ~best]
        removed = s[~k]
        if len(extra_kept) and len(removed):
            assert removed.max() <= extra_kept.min()


def test_unreachable_ratio_names_the_largest():
    largest = largest_ratio(NET)
    assert largest == pytest.approx(9 * sum(o * c for o, c in NET.values()) / (4 * sum(o for o, _ in NET.values())))
    keep = allocate_kernels(random_scores(1), largest)
    assert all(int(k.sum()) == k.shape[0] for k in keep.values())  # one kernel per filter
    with pytest.raises(RatioError, match=f"largest reachable ratio .* is {math.floor(largest * 100) / 100:g}x"):
        allocate_kernels(random_scores(1), largest * 1.05)


@pytest.mark.parametrize("ratio", [1.0, 0.5, -3.0, float("nan"), float("inf")])
def test_ratio_not_above_one_is_refused(ratio):
    with pytest.raises(RatioError):
        allocate_kernels(random_scores(2), ratio)


def test_ratio_below_pattern_ratio_keeps_every_kernel():
    keep = allocate_kernels(random_scores(3), 1.5)
    assert all(k.all() for k in keep.values())


def test_select_plan_meets_ratio_and_uses_the_library():
    g = torch.Generator().manual_seed(7)
    imp = {n: torch.rand(o, c, 9, generator=g).pow(3) for n, (o, c) in NET.items()}
    plan = select_plan(imp, {n: (o, c, 3, 3) for n, (o, c) in NET.items()}, 8.0, patterns=6)
    assert len(plan.library) == 6
    assert plan.ratio_achieved == pytest.approx(8.0, rel=0.01)
    for name, layer in plan.layers.items():
        a = layer.assignment
        assert a.min() >= -1 and a.max() < 6
        kept = a >= 0
        # every kept kernel has its best library pattern
        lib = plan.library
        best = lib.assign(imp[name]).numpy()
        assert np.array_equal(a[kept], best[kept])


def _macs(shapes, pixels):
    return {n: o * c * 9 * pixels[n] for n, (o, c) in shapes.items()}


@pytest.mark.parametrize("ratio", [4.0, 8.0])
def test_macs_allocation_prunes_high_resolution_layers_more(ratio):
    # Same scores, same shapes; one layer works on 4x the pixels of the other.
    shapes = {"wide_image": (32, 32), "small_image": (32, 32)}
    g = torch.Generator().manual_seed(int(ratio))
    s = torch.rand(32, 32, generator=g)
    scores = {"wide_image": s.clone(), "small_image": s.clone()}
    macs = _macs(shapes, {"wide_image": 56 * 56, "small_image": 28 * 28})
    by = {a: allocate_kernels(scores, ratio, allocation=a, macs=macs) for a in ALLOCATIONS}
    assert int(by["importance"]["wide_image"].sum()) == int(by["importance"]["small_image"].sum())
    for allocation in ("balanced", "macs"):
        assert int(by[allocation]["wide_image"].sum()) < int(by[allocation]["small_image"].sum())
        assert ratio_of(by[allocation], shapes) == pytest.approx(ratio, rel=0.01)
    kept_macs = {a: sum(macs[n] * float(k.float().mean()) for n, k in keep.items()) for a, keep in by.items()}
    # The cost exponent orders them: importance (0) keeps the most MACs, balanced (1/2) fewer, macs (1) no more than
    # balanced (at 8x both reach the wide layer's floor).
    assert kept_macs["macs"] <= kept_macs["balanced"] < kept_macs["importance"]


def test_kernel_costs_and_equal_costs_change_nothing():
    shapes = {"a": (8, 8), "b": (8, 8), "c": (4, 8)}
    macs = _macs(shapes, {"a": 16, "b": 1, "c": 4})
    # MACs per kernel 9*16, 9, 9*4, weighted by kernel count (64, 64, 32): mean 9*(16*64 + 64 + 4*32)/160.
    mean = (16 * 64 + 64 + 4 * 32) / 160
    costs = kernel_costs(shapes, macs)
    assert costs == pytest.approx({"a": 16 / mean, "b": 1 / mean, "c": 4 / mean})
    # Where every kernel costs the same, every allocation is the importance allocation.
    scores = random_scores(11)
    same = {n: 7 * o * c for n, (o, c) in ((n, tuple(v.shape)) for n, v in scores.items())}
    plain = allocate_kernels(scores, 8.0)
    for allocation in ALLOCATIONS:
        keep = allocate_kernels(scores, 8.0, allocation=allocation, macs=same)
        assert all(torch.equal(plain[n], keep[n]) for n in plain), allocation


def test_macs_allocation_without_macs_equals_importance_and_unknown_names_fail():
    scores = random_scores(5)
    plain = allocate_kernels(scores, 8.0)
    no_macs = allocate_kernels(scores, 8.0, allocation="macs", macs=None)
    assert all(torch.equal(plain[n], no_macs[n]) for n in NET)
    with pytest.raises(ValueError, match="allocation"):
        allocate_kernels(scores, 8.0, allocation="latency")
