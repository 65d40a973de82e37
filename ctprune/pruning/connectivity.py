"""Connectivity pruning: which whole 3x3 kernels (one input channel of one filter) are removed, layer by layer.

Budget. With every kept kernel holding 4 weights, a global ratio R over layers of (O_l, C_l, 3, 3) weights keeps
    target = round(sum_l 9 * O_l * C_l / (4 * R))   kernels in all,
that is a mean kept-kernel fraction u = 9 / (4R). R below 2.25 (u > 1) is met by patterns alone: every kernel is kept and
the model is pruned 2.25x (logged). Every filter keeps at least one kernel, so the largest reachable ratio is
    sum_l 9 * O_l * C_l / (4 * sum_l O_l)     (RatioError beyond it).

Allocation (layers that matter more keep more). A kernel's score is the importance on the taps its pattern keeps (what
removing it would actually cost, now that the other 5 taps go anyway). Scores are divided by their layer's L2 norm
(Molchanov et al. 2017), which makes layers comparable and leans towards pruning wide layers, whose many kernels each
carry less; then one global threshold picks the kept kernels, within per-layer bounds u/spread <= kept fraction <=
min(1, u*spread) so no layer is gutted or spared by the threshold alone. The floor yields where one-kernel-per-filter
already costs more than it. Per-layer work is vectorised; the only Python loop is over layers.

Latency-aware allocation (`allocation="macs"`). The same, with each layer's normalised scores divided by the layer's
multiply-adds per kernel (its output pixels) relative to the weighted mean: importance per multiply-add, the usual
FLOPs-regularised criterion. A kernel of a 224x224 layer then has to matter 256 times more than one of a 14x14 layer
to be kept, so the per-layer bounds decide most of the split: high-resolution layers go to their floor and the
network's MACs shrink about as much as its weights, where the importance allocation keeps the early, wide-image layers
(few channels, each carrying a lot) and often cuts MACs only half as much as weights.

`allocation="balanced"` divides by the square root of that relative cost instead: a 224x224 kernel has to matter 16
times more than a 14x14 one. On the examples' ResNet-20 at 8x (28/14/7 pixels a side) it keeps every stage near 8x
(MACs 7.7x fewer, against 4.4x by importance and 10.9x per MAC).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch

from ctprune.errors import RatioError

log = logging.getLogger(__name__)

PATTERN_RATIO = 9 / 4  # what 4-of-9 patterns alone give


def kernel_budget(shapes: Mapping[str, tuple[int, int]], ratio: float) -> int:
    """Kept kernels in all for `ratio` over layers {name: (O, C)}; RatioError if unreachable."""
    ratio = check_ratio(ratio)
    total_kernels = sum(o * c for o, c in shapes.values())
    if total_kernels == 0:
        raise RatioError("there is no prunable 3x3 Conv kernel to reach the ratio with.")
    check_reachable(ratio, largest_ratio(shapes), len(shapes),
                    "every filter keeping at least one 4-weight kernel")
    if ratio < PATTERN_RATIO:
        log.warning("ratio %.3gx is below what 4-of-9 patterns alone give: every kernel is kept, the result is 2.25x", ratio)
        return total_kernels
    return min(total_kernels, max(sum(o for o, _ in shapes.values()), round(9 * total_kernels / (4 * ratio))))


def largest_ratio(shapes: Mapping[str, tuple[int, int]]) -> float:
    """Largest reachable ratio: one kernel of 4 weights per filter."""
    return 9 * sum(o * c for o, c in shapes.values()) / (4 * sum(o for o, _ in shapes.values()))


def keep_bounds(shapes: Mapping[str, tuple[int, int]], target: int, spread: float) -> dict[str, tuple[int, int]]:
    """{layer: (min kept, max kept)} kernels, with sum(min) <= target <= sum(max)."""
    if spread < 1.0:
        raise ValueError(f"spread must be >= 1, got {spread}")
    total = sum(o * c for o, c in shapes.values())
    u = target / total
    floors = {n: max(o, math.ceil(o * c * u / spread)) for n, (o, c) in shapes.items()}
    per_filter = sum(o for o, _ in shapes.values())
    extra = sum(floors.values()) - per_filter
    room = target - per_filter
    if extra > room:  # the relative floors yield to the hard one-kernel-per-filter floor
        scale = room / extra if extra else 0.0
        floors = {n: o + math.floor(scale * (floors[n] - o)) for n, (o, _) in shapes.items()}
    ceilings = {n: max(floors[n], min(o * c, math.ceil(o * c * u * spread))) for n, (o, c) in shapes.items()}
    return {n: (floors[n], ceilings[n]) for n in shapes}


from ctprune.pruning.allocation import (ALLOCATIONS, COST_EXPONENTS, LayerGroups, allocate_groups,  # noqa: E402
                                       check_ratio, check_reachable)


def kernel_costs(shapes: Mapping[str, tuple[int, int]], macs: Mapping[str, int] | None) -> dict[str, float]:
    """{layer: multiply-adds per kernel relative to the kernel-weighted mean}; 1.0 where a layer's MACs are unknown."""
    per_kernel = {n: macs[n] / (o * c) for n, (o, c) in shapes.items() if macs and macs.get(n)}
    if not per_kernel:
        return {n: 1.0 for n in shapes}
    known = sum(shapes[n][0] * shapes[n][1] for n in per_kernel)
    mean = sum(per_kernel[n] * shapes[n][0] * shapes[n][1] for n in per_kernel) / known
    return {n: per_kernel.get(n, mean) / mean for n in shapes}


def kernel_groups(scores: torch.Tensor, cost: float = 1.0, max_density: float | None = None) -> LayerGroups:
    """A pattern layer's (O, C) kernel scores as allocation groups: 4 weights each, every filter's best one forced;
    `max_density`: the density above which its PatternConv gains no speed (the allocation's cap)."""
    o, c = scores.shape
    flat = scores.detach().reshape(-1)
    forced = torch.zeros(o * c, dtype=torch.bool, device=flat.device)
    forced[torch.argmax(scores.detach().reshape(o, c), dim=1) + torch.arange(o, device=flat.device) * c] = True
    return LayerGroups(flat, torch.full((o * c,), 4.0, device=flat.device), forced, 9 * o * c, cost, max_density)


def allocate_kernels(scores: Mapping[str, torch.Tensor], ratio: float, spread: float = 2.5,
                     allocation: str = "importance", macs: Mapping[str, int] | None = None,
                     max_density: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
    """{layer: (O, C) kernel scores} -> {layer: (O, C) bool, True = kept} meeting `ratio` exactly (up to rounding).

    allocation "importance": normalised importance; "macs": normalised importance per multiply-add; "balanced": per
    square root of multiply-adds ("macs" and "balanced" need `macs`, {layer: dense MACs per sample}; layers without it
    count as average). max_density {layer: density}: above it the layer's PatternConv would gain no speed, so the
    budget is not spent there while the ratio can be met otherwise. The split itself is ctprune.pruning.allocation's,
    shared with the sparse layers."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    shapes = {n: (s.shape[0], s.shape[1]) for n, s in scores.items()}
    budget = 4 * kernel_budget(shapes, ratio)
    costs = kernel_costs(shapes, macs)
    groups = {n: kernel_groups(s, costs[n], (max_density or {}).get(n)) for n, s in scores.items()}
    keep = allocate_groups(groups, budget, spread=spread, exponent=COST_EXPONENTS[allocation])
    return {name: k.reshape(shapes[name]) for name, k in keep.items()}
