"""One weight budget split across layers of every form: which groups of weights each layer keeps.

A group is what pruning keeps or removes as one: a 3x3 pattern kernel (4 weights) or a sparse block column (the
weights of `block` output channels at one input position). Every layer offers its groups with a score (importance
on the weights the group would keep), a size in weights, and the groups it must keep (one per filter / per block,
so no output channel goes dead). The split:
- scores are divided by their layer's L2 norm (Molchanov et al. 2017: layers comparable; wide layers, whose many
  groups each carry less, give up more), then by the layer's relative cost per weight raised to the allocation's
  exponent ("importance" 0, "balanced" 0.5, "macs" 1: see connectivity.py), then by the group's size (value per weight);
- each layer keeps a density between d/spread and min(its densest form, d*spread) of its dense weights, d being the
  model-wide density 1/ratio (the relative floor yields where the groups it must keep already cost more);
- above the floors, one global ranking by value fills the budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ctprune.errors import RatioError

COST_EXPONENTS = {"importance": 0.0, "balanced": 0.5, "macs": 1.0}
ALLOCATIONS = tuple(COST_EXPONENTS)


@dataclass
class LayerGroups:
    """One layer's offer. scores and sizes: (n,) tensors; forced: (n,) bool, groups that must be kept."""

    scores: torch.Tensor
    sizes: torch.Tensor
    forced: torch.Tensor
    dense_weights: int  # the layer's weights before pruning
    cost: float = 1.0  # multiply-adds (or their equivalent) per weight, relative or absolute
    max_density: float | None = None  # above this the layer's compact form is no faster than dense (sparse_cost.py)


def check_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not math.isfinite(ratio) or ratio <= 1.0:
        raise RatioError(f"the compression ratio must be a number greater than 1 (like 8x), got {ratio:g}.")
    return ratio


def check_reachable(ratio: float, largest: float, layers: int, floor: str) -> None:
    """RatioError naming the largest reachable ratio over `layers` layers when `ratio` is beyond it; floor: what every
    layer keeps at the least, which sets that largest ratio."""
    if ratio > largest * (1 + 1e-9):
        raise RatioError(
            f"a {ratio:g}x ratio cannot be reached: with {floor}, "
            f"the largest reachable ratio over these {layers} layers is {math.floor(largest * 100) / 100:g}x."
        )


def largest_ratio(layers: Mapping[str, LayerGroups]) -> float:
    """Dense weights over the weights of the groups every layer must keep."""
    floor = sum(float(l.sizes[l.forced].sum()) for l in layers.values())
    total = sum(l.dense_weights for l in layers.values())
    return total / floor if floor else math.inf


def weight_budget(layers: Mapping[str, LayerGroups], ratio: float) -> int:
    """Kept weights for `ratio` over these layers; RatioError naming the largest reachable ratio when it cannot be met."""
    ratio = check_ratio(ratio)
    total = sum(l.dense_weights for l in layers.values())
    if total == 0:
        raise RatioError("there is no prunable layer to reach the ratio with.")
    check_reachable(ratio, largest_ratio(layers), len(layers),
                    "every output channel keeping at least one group of weights")
    return round(total / ratio)


def allocate_groups(layers: Mapping[str, LayerGroups], budget: int, spread: float = 2.5,
                    exponent: float = 0.0) -> dict[str, torch.Tensor]:
    """{layer: (n,) bool, True = kept} whose kept sizes add up to `budget` weights (to within one group)."""
    if spread < 1.0:
        raise ValueError(f"spread must be >= 1, got {spread}")
    total = sum(l.dense_weights for l in layers.values())
    density = budget / total
    costs = _relative_costs(layers)
    bounds = _weight_bounds(layers, budget, density, spread)
    keep, pools = {}, []
    for name, layer in layers.items():
        sizes = layer.sizes.to(torch.float64)
        score = layer.scores.detach().double().reshape(-1)
        l2 = torch.linalg.vector_norm(score)
        score = score / l2 if l2 > 0 else torch.full_like(score, 1.0 / math.sqrt(score.numel()))
        value = score / (costs[name] ** exponent) / sizes
        kept = layer.forced.clone().reshape(-1)
        lo, hi = bounds[name]
        rest = torch.nonzero(~kept).reshape(-1)
        rest = rest[torch.sort(value[rest], descending=True, stable=True).indices]
        cum = torch.cumsum(sizes[rest], 0)
        have = float(sizes[kept].sum())
        # enough groups to reach the floor (the last one may cross it); no more than fit under the ceiling
        n_lo = int(torch.searchsorted(cum, torch.tensor(lo - have - 1e-9, dtype=torch.float64))) + 1 if lo > have else 0
        n_lo = min(n_lo, len(rest))
        n_hi = int(torch.searchsorted(cum, torch.tensor(hi - have, dtype=torch.float64), right=True))
        kept[rest[:n_lo]] = True
        cand = rest[n_lo:max(n_lo, n_hi)]
        pools.append((name, cand, value[cand], sizes[cand]))
        keep[name] = kept
    remaining = budget - sum(float(layers[n].sizes.double()[keep[n]].sum()) for n in layers)
    if remaining > 0 and pools:
        values = torch.cat([p[2] for p in pools])
        sizes = torch.cat([p[3] for p in pools])
        owners = torch.cat([torch.full((len(p[1]),), i, dtype=torch.long) for i, p in enumerate(pools)])
        positions = torch.cat([torch.arange(len(p[1])) for p in pools])
        order = torch.sort(values, descending=True, stable=True).indices
        count = int(torch.searchsorted(torch.cumsum(sizes[order], 0), torch.tensor(remaining - 0.5, dtype=torch.float64)))
        chosen = order[: count + 1] if count < len(order) else order
        # chosen groups split by owning layer in one sort (a mask per layer made this quadratic in the layer count)
        chosen_owners = owners[chosen]
        by_owner = positions[chosen][torch.argsort(chosen_owners, stable=True)]
        counts = torch.bincount(chosen_owners, minlength=len(pools)).tolist()
        for (name, cand, _, _), mine in zip(pools, torch.split(by_owner, counts)):
            keep[name][cand[mine]] = True
    return keep


def _relative_costs(layers: Mapping[str, LayerGroups]) -> dict[str, float]:
    """Each layer's cost per weight over the weight-weighted mean."""
    total = sum(l.dense_weights for l in layers.values())
    mean = sum(l.cost * l.dense_weights for l in layers.values()) / max(total, 1)
    return {n: (l.cost / mean if mean > 0 else 1.0) for n, l in layers.items()}


def _speed_cap(layer: LayerGroups) -> float:
    """Kept weights above which the layer would run no faster than dense: the budget is not spent there (a layer
    that can never win keeps the usual ceiling and stays a dense op holding its zeros)."""
    if layer.max_density is None or layer.max_density <= 0:
        return float("inf")
    return layer.max_density * layer.dense_weights


def _weight_bounds(layers, budget, density, spread) -> dict[str, tuple[float, float]]:
    """{layer: (min kept weights, max kept weights)}; the relative floors yield to the forced groups when tight."""
    forced = {n: float(l.sizes[l.forced].sum()) for n, l in layers.items()}
    full = {n: float(l.sizes.sum()) for n, l in layers.items()}
    floors = {n: max(forced[n], min(full[n], l.dense_weights * density / spread)) for n, l in layers.items()}
    extra = sum(floors[n] - forced[n] for n in layers)
    room = budget - sum(forced.values())
    if extra > room:
        scale = max(room, 0) / extra if extra else 0.0
        floors = {n: forced[n] + scale * (floors[n] - forced[n]) for n in layers}
    free = {n: max(floors[n], min(full[n], l.dense_weights * density * spread)) for n, l in layers.items()}
    ceilings = {n: max(floors[n], min(free[n], _speed_cap(l))) for n, l in layers.items()}
    short = budget - sum(ceilings.values())
    if short > 0:  # the speed caps cannot hold the budget: lift them evenly rather than prune past the ratio asked
        room = sum(free.values()) - sum(ceilings.values())
        lift = min(1.0, short / room) if room > 0 else 0.0
        ceilings = {n: ceilings[n] + lift * (free[n] - ceilings[n]) for n in layers}
    return {n: (floors[n], ceilings[n]) for n in layers}
