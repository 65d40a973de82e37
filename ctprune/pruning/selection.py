"""From importance to a PruningPlan: generate the library, assign patterns, allocate what every layer keeps.

Two rounds: the first library is voted by every kernel; connectivity then removes kernels, and the library is voted
again by the kept kernels only (removed kernels should not decide which shapes the network keeps), patterns are
re-assigned and the budget re-allocated with the new scores. Sparse layers (1x1, other kernel sizes, FC) take part
in the same allocation as groups of `block` output channels at one input position (pruning/allocation.py); a model
with only sparse layers has an empty library.

Blocks of filters (`blocks`, pruning/blocks.py): a blocked pattern layer is selected as if each block were one filter
whose importance is the sum of its members': its pattern per (block, channel) and whether the (block, channel) keeps
its kernels are chosen once, and every filter of the block gets that row. In the allocation one (block, channel) is
one group of (filters in the block) x 4 weights, so the budget is met as per-filter kernels meet it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from ctprune.pruning.allocation import COST_EXPONENTS, LayerGroups, allocate_groups, weight_budget
from ctprune.pruning.blocks import block_rows, block_sum
from ctprune.pruning.connectivity import allocate_kernels, kernel_costs, kernel_groups
from ctprune.pruning.layers import SparseTarget
from ctprune.pruning.patterns import PatternLibrary
from ctprune.pruning.plan import PruningPlan, SparseLayer
from ctprune.runtime.memory import release_freed_memory


def select_plan(
    importance: Mapping[str, torch.Tensor],
    weight_shapes: Mapping[str, tuple[int, ...]],
    ratio: float,
    patterns: int = 8,
    spread: float = 2.5,
    skipped: Mapping[str, str] | None = None,
    importance_kind: str = "gradient",
    macs: Mapping[str, int] | None = None,
    allocation: str = "importance",
    sparse: Mapping[str, SparseTarget] | None = None,
    costs: Mapping[str, float] | None = None,
    max_density: Mapping[str, float] | None = None,
    blocks: Mapping[str, np.ndarray] | None = None,
) -> PruningPlan:
    """importance {layer: (O, C, T) in the layer's mask view} -> the plan meeting `ratio` over these layers
    (RatioError if it cannot). Layers named in `sparse` are pruned in blocks; the others are 3x3 pattern layers.

    allocation: how the budget is split between layers ("importance"; "balanced": importance per square root of
    multiply-adds per weight; "macs": per multiply-add; see ctprune.pruning.connectivity). `costs`: multiply-adds per
    weight by layer, where known (FC layers: an equivalent, pruning/layers.py); else from `macs`.
    blocks {pattern layer: (O,) block id per filter}: the layer's filters share their kernels block by block."""
    sparse = dict(sparse or {})
    blocks = {n: torch.as_tensor(np.asarray(b), dtype=torch.int64) for n, b in (blocks or {}).items()
              if n not in sparse}
    rows = {n: block_rows(ids) for n, ids in blocks.items()}
    # a blocked layer's importance is summed per block as it is read: one layer's float per weight alive at a time
    pattern_imp = {n: (block_sum(importance[n], blocks[n], len(rows[n])) if n in blocks
                       else importance[n].detach().float()) for n in importance if n not in sparse}
    if not sparse and not blocks:
        return _pattern_only(pattern_imp, weight_shapes, ratio, patterns, spread, skipped, importance_kind, macs,
                             allocation, max_density)
    if sparse:
        costs = _costs(weight_shapes, macs, costs)
    else:  # pattern layers only: the costs the per-filter path (allocate_kernels) uses
        costs = kernel_costs({n: tuple(weight_shapes[n][:2]) for n in pattern_imp}, macs)
    # A sparse layer's importance is read once, for its block sums: with a lazy mapping (magnitude_importance) only
    # one layer's float per weight is alive at a time.
    block_scores, out_channels = {}, {}
    for n in sparse:
        if hasattr(importance, "block_sums"):  # MagnitudeImportance: summed a few rows at a time
            block_scores[n] = importance.block_sums(n, sparse[n].block)
            out_channels[n] = importance.views[n].shape[0]
            continue
        imp = importance[n]
        out_channels[n] = imp.shape[0]
        block_scores[n] = block_importance(imp.detach().float(), sparse[n].block)
        del imp
    sparse_groups = {n: _block_groups(s, out_channels[n], sparse[n].block, costs.get(n, 1.0))
                     for n, s in block_scores.items()}
    for n, cap in (max_density or {}).items():
        if n in sparse_groups:
            sparse_groups[n].max_density = cap
    voters, library, assignments = None, PatternLibrary.empty(), {}
    for _ in range(2 if pattern_imp else 1):
        groups = dict(sparse_groups)
        if pattern_imp:
            library = PatternLibrary.generate(pattern_imp, size=patterns, voters=voters)
            assignments = {n: library.assign(imp) for n, imp in pattern_imp.items()}
            for n, imp in pattern_imp.items():
                kept = library.kept_importance(imp, assignments[n])
                if n in rows:
                    groups[n] = block_kernel_groups(kept, rows[n], math.prod(weight_shapes[n]), costs.get(n, 1.0))
                else:  # single filters: the per-filter path's break-even caps the budget spent here
                    groups[n] = kernel_groups(kept, costs.get(n, 1.0), (max_density or {}).get(n))
        keep = allocate_groups(groups, weight_budget(groups, ratio), spread=spread,
                               exponent=COST_EXPONENTS[_checked(allocation)])
        voters = {n: keep[n].reshape(pattern_imp[n].shape[:2]) for n in pattern_imp}
        del groups
        release_freed_memory()  # the ranking's work space, before the second round makes its own
    for n, ids in blocks.items():  # every filter takes its block's row
        assignments[n], voters[n] = assignments[n][ids], voters[n][ids]
    plan = PruningPlan.from_selection(library, assignments, voters, weight_shapes, ratio, skipped=skipped,
                                      importance=importance_kind, macs=macs,
                                      blocks={n: ids.numpy() for n, ids in blocks.items()})
    for n, target in sparse.items():
        o = out_channels[n]
        plan.sparse[n] = SparseLayer(tuple(int(d) for d in weight_shapes[n]), target.block, target.transposed,
                                     keep[n].reshape(-1, block_scores[n].shape[1]).cpu().numpy(), (macs or {}).get(n),
                                     target.kind, o)
    return plan


def block_importance(view: torch.Tensor, block: int) -> torch.Tensor:
    """(O, C, T) importance -> (ceil(O / block), C * T): summed over each block of `block` consecutive output channels."""
    o = view.shape[0]
    flat = view.reshape(o, -1)
    pad = (-o) % block
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad, flat.shape[1])])
    return flat.reshape(-1, block, flat.shape[1]).sum(1)


def block_kernel_groups(scores: torch.Tensor, rows: torch.Tensor, dense_weights: int, cost: float = 1.0) -> LayerGroups:
    """A blocked pattern layer's (blocks, C) kernel scores as allocation groups: a (block, channel) keeps 4 weights in
    each of the block's `rows` filters; every block's best channel is forced (no filter goes dead)."""
    nb, c = scores.shape
    flat = scores.detach().reshape(-1)
    forced = torch.zeros(nb * c, dtype=torch.bool, device=flat.device)
    forced[torch.argmax(scores.detach(), dim=1) + torch.arange(nb, device=flat.device) * c] = True
    sizes = (4.0 * rows.to(flat.device, torch.float32))[:, None].expand(nb, c).reshape(-1)
    # valued per weight as the layer's single-filter kernels would be (allocation.LayerGroups.value_scale): without it
    # a blocked layer lost sqrt(N) against every other layer: light VGG-19 at 8x --block 16 kept 5x fewer 3x3 weights
    # than per filter (its 3x3 layers 20x smaller against 3.7x) and its FC layers more
    scale = math.sqrt(float(rows.float().mean()))
    return LayerGroups(flat, sizes, forced, int(dense_weights), cost, value_scale=scale)


def _block_groups(scores: torch.Tensor, out_channels: int, block: int, cost: float) -> LayerGroups:
    """A sparse layer's block scores as allocation groups: size = the block's channels, each block's best forced."""
    nb, r = scores.shape
    rows = torch.full((nb,), float(block), device=scores.device)
    rows[-1] = out_channels - block * (nb - 1)
    forced = torch.zeros(nb, r, dtype=torch.bool, device=scores.device)
    forced[torch.arange(nb, device=scores.device), scores.argmax(1)] = True
    return LayerGroups(scores.reshape(-1), rows[:, None].expand(nb, r).reshape(-1), forced.reshape(-1),
                       out_channels * r, cost)


def _costs(weight_shapes, macs, costs) -> dict[str, float]:
    out = {n: macs[n] / math.prod(s) for n, s in weight_shapes.items() if macs and macs.get(n)}
    out.update(costs or {})
    return out


def _checked(allocation: str) -> str:
    if allocation not in COST_EXPONENTS:
        raise ValueError(f"allocation must be one of {tuple(COST_EXPONENTS)}, got {allocation!r}")
    return allocation


def _pattern_only(importance, weight_shapes, ratio, patterns, spread, skipped, importance_kind, macs, allocation,
                  max_density=None):
    voters = None
    for _ in range(2):
        library = PatternLibrary.generate(importance, size=patterns, voters=voters)
        assignments = {n: library.assign(imp) for n, imp in importance.items()}
        scores = {n: library.kept_importance(importance[n], assignments[n]) for n in importance}
        keep = allocate_kernels(scores, ratio, spread=spread, allocation=allocation, macs=macs, max_density=max_density)
        voters = keep
    return PruningPlan.from_selection(
        library, assignments, keep, weight_shapes, ratio, skipped=skipped, importance=importance_kind, macs=macs
    )
