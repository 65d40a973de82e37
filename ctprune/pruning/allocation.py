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
    # Values are multiplied by this after the L2 normalisation: a layer offering its weights as n groups of N
    # single-filter groups' sums has an L2 norm sqrt(N) times theirs (uniform scores), so its groups' values per weight
    # are sqrt(N) times lower than the same layer's single-filter kernels would be; sqrt(N) puts them back on one scale
    value_scale: float = 1.0


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
    """{layer: (n,) bool, True = kept} whose kept sizes add up to `budget` weights (to within one group).

    Memory stays near 12 bytes per group (VGG-19's FC layers offer 15 M groups): each layer ranks its own groups
    once and keeps only its candidates' values, positions and running sizes; the global ranking is never built —
    the cut between the layers is a value threshold found by bisection, ties taken in layer order, as one stable
    sort of all candidates would take them."""
    if spread < 1.0:
        raise ValueError(f"spread must be >= 1, got {spread}")
    total = sum(l.dense_weights for l in layers.values())
    density = budget / total
    costs = _relative_costs(layers)
    bounds = _weight_bounds(layers, budget, density, spread)
    keep, pools = {}, []
    for name, layer in layers.items():
        kept = layer.forced.clone().reshape(-1)
        order, values, cum = _ranked_candidates(layer, costs[name] ** exponent)
        have = float(layer.sizes.reshape(-1)[kept].sum())
        lo, hi = bounds[name]
        # enough groups to reach the floor (the last one may cross it); no more than fit under the ceiling
        n_lo = _count_below(cum, lo - have - 1e-9) + 1 if lo > have else 0
        n_lo = min(n_lo, len(order))
        n_hi = _count_at_most(cum, hi - have)
        kept[order[:n_lo].long()] = True
        stop = max(n_lo, n_hi)
        base = cum[n_lo - 1] if n_lo > 0 else 0
        pools.append((name, order[n_lo:stop], -values[n_lo:stop], cum[n_lo:stop] - base))
        keep[name] = kept
        del order, values, cum
    remaining = budget - sum(float(layers[n].sizes.reshape(-1)[keep[n]].sum()) for n in layers)
    if remaining > 0 and pools:
        for (name, cand, _, _), count in zip(pools, _threshold_counts(pools, remaining - 0.5)):
            keep[name][cand[:count].long()] = True
    return keep


def _ranked_candidates(layer: LayerGroups, cost_factor: float):
    """A layer's unforced groups by value (normalised score / cost factor / size), best first, ties by position:
    (positions int32, values float32, running sum of sizes)."""
    sizes = layer.sizes.reshape(-1)
    scores = layer.scores.detach().reshape(-1)
    l2 = float(torch.linalg.vector_norm(scores, dtype=torch.float64))
    if l2 > 0:
        value = scores.float() / (l2 * cost_factor)
    else:
        value = torch.full((len(scores),), 1.0 / math.sqrt(len(scores)) / cost_factor)
    value.div_(sizes)
    if layer.value_scale != 1.0:
        value.mul_(layer.value_scale)
    forced = layer.forced.reshape(-1)
    value[forced] = -math.inf  # last in the ranking, and cut off: they are kept already
    values, order = torch.sort(value, descending=True, stable=True)
    del value
    m = len(order) - int(forced.sum())
    order = order[:m].to(torch.int32)  # the sort's int64 positions freed before the running sizes are made
    whole = torch.int32 if float(sizes.sum()) < 2 ** 31 else torch.int64  # sizes are whole numbers of weights
    cum = torch.index_select(sizes, 0, order).to(whole).cumsum_(0)
    return order, values[:m], cum


def _count_below(cum: torch.Tensor, x: float) -> int:
    """Entries of the (non-decreasing, integer) `cum` below x."""
    return int(torch.searchsorted(cum, torch.tensor([math.ceil(x)], dtype=cum.dtype)))


def _count_at_most(cum: torch.Tensor, x: float) -> int:
    return int(torch.searchsorted(cum, torch.tensor([math.floor(x)], dtype=cum.dtype), right=True))


def _threshold_counts(pools, target: float) -> list[int]:
    """How many of each pool's candidates (ranked best first; pools hold their values negated, so ascending) the
    shortest prefix of the merged ranking whose sizes reach `target` takes; every candidate when none does."""
    def sizes_at_least(v: float) -> tuple[list[int], float]:
        key = torch.tensor([-v], dtype=torch.float32)
        counts = [int(torch.searchsorted(neg, key, right=True)) for _, _, neg, _ in pools]
        return counts, sum(float(cum[c - 1]) for (_, _, _, cum), c in zip(pools, counts) if c)

    everything = [len(cand) for _, cand, _, _ in pools]
    if sum(float(cum[-1]) for _, _, _, cum in pools if len(cum)) < target:
        return everything
    # the largest value v (bisection over float32 bit patterns, which order non-negative floats) whose groups of
    # value >= v reach the target: the merged ranking's crossing group has value v
    lo, hi = 0, 0x7F800000  # 0.0 reaches the target (checked above), +inf may not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sizes_at_least(_float_of_bits(mid))[1] >= target:
            lo = mid
        else:
            hi = mid - 1
    v = _float_of_bits(lo)
    key = torch.tensor([-v], dtype=torch.float32)
    above = [int(torch.searchsorted(neg, key)) for _, _, neg, _ in pools]  # value > v
    at_least = sizes_at_least(v)[0]
    need = target - sum(float(cum[c - 1]) for (_, _, _, cum), c in zip(pools, above) if c)
    counts = list(above)
    for i, (_, _, _, cum) in enumerate(pools):  # the ties at v, in layer order, until the target is reached
        if need <= 0:
            break
        start = float(cum[above[i] - 1]) if above[i] else 0.0
        tie_sizes = cum[above[i]:at_least[i]].double() - start
        if len(tie_sizes) == 0:
            continue
        if float(tie_sizes[-1]) < need:
            counts[i] = at_least[i]
            need -= float(tie_sizes[-1])
        else:
            counts[i] = above[i] + int(torch.searchsorted(tie_sizes, torch.tensor([need], dtype=torch.float64))) + 1
            need = 0
    return counts


def _float_of_bits(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))


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
