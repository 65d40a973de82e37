"""From importance to a PruningPlan: generate the library, assign patterns, allocate kept kernels.

Two rounds: the first library is voted by every kernel; connectivity then removes kernels, and the library is voted
again by the kept kernels only (removed kernels should not decide which shapes the network keeps), patterns are
re-assigned and connectivity re-allocated with the new scores.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ctprune.pruning.connectivity import allocate_kernels
from ctprune.pruning.patterns import PatternLibrary
from ctprune.pruning.plan import PruningPlan


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
) -> PruningPlan:
    """importance {layer: (O, C, 9)} -> the plan meeting `ratio` over these layers (RatioError if it cannot).

    allocation: how kept kernels are split between layers ("importance"; "balanced": importance per square root of
    multiply-adds; "macs": per multiply-add; see ctprune.pruning.connectivity)."""
    importance = {n: imp.detach().float() for n, imp in importance.items()}
    voters = None
    for _ in range(2):
        library = PatternLibrary.generate(importance, size=patterns, voters=voters)
        assignments = {n: library.assign(imp) for n, imp in importance.items()}
        scores = {n: library.kept_importance(importance[n], assignments[n]) for n in importance}
        keep = allocate_kernels(scores, ratio, spread=spread, allocation=allocation, macs=macs)
        voters = keep
    return PruningPlan.from_selection(
        library, assignments, keep, weight_shapes, ratio, skipped=skipped, importance=importance_kind, macs=macs
    )
