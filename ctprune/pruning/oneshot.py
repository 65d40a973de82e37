"""The prune-after baseline: one-shot magnitude patterns + connectivity, then the same fine-tune under hard masks.

Patterns and kept kernels are chosen once from w^2 before the first step (same library generation, assignment and
layer allocation as ClickTrain, only the importance differs and nothing is re-selected); the masks then hold for the
whole fine-tune. Comparing it with ClickTrainPruner at the same total time is issue 4's "prune during vs after" row.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ctprune.pruning.blocks import filter_blocks
from ctprune.pruning.clicktrain import ClickTrainPruner, check_prunable
from ctprune.pruning.importance import magnitude_importance
from ctprune.pruning.plan import PruningPlan
from ctprune.pruning.selection import select_plan


def one_shot_plan(
    weights: Mapping[str, torch.Tensor], ratio: float, patterns: int = 8, spread: float = 2.5, apply: bool = True,
    block: int = 1, **plan_info
) -> PruningPlan:
    """Magnitude plan for {conv name: (O, C, 3, 3) weight}; zeroes the removed weights in place when `apply`.
    block > 1: filters in blocks of that many sharing every kernel (pruning/blocks.py)."""
    check_prunable(weights)
    if block > 1:
        plan_info["blocks"] = {n: filter_blocks(w, block) for n, w in weights.items()}
    plan = select_plan(
        magnitude_importance(weights),
        {n: tuple(w.shape) for n, w in weights.items()},
        ratio,
        patterns=patterns,
        spread=spread,
        importance_kind="magnitude",
        **plan_info,
    )
    if apply:
        plan.apply(weights)
    return plan


class OneShotPruner(ClickTrainPruner):
    """TrainHooks for the baseline: masks chosen by magnitude in begin(), hard from the first step to the last."""

    def begin(self, total_steps: int, steps_per_epoch: int | None = None) -> None:
        super().begin(total_steps, steps_per_epoch)
        if not self.hard:
            self.meter.reset()  # magnitude only, even if someone fed gradients before
            self._select(final=True)
