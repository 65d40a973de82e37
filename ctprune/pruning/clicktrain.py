"""ClickTrainPruner: ClickTrain's pattern + connectivity pruning as hooks of a training loop (ctprune.train's TrainHooks).

The loop calls, per optimizer step `step` (0-based, global):
    loss = task_loss + pruner.extra_loss(step)     # group lasso in the soft phase, else None
    loss.backward(); pruner.after_backward(step)   # importance (w * dL/dw)^2 from .grad, warm-up and soft phases
    optimizer.step(); pruner.after_step(step)      # proximal lasso; (re-)selection at the schedule's points; hard masks
and begin(total_steps, steps_per_epoch) before the first step, end_epoch(epoch) after each epoch, final_plan() at the
end. state_dict() / load_state_dict() make a resumed run continue exactly (importance, plan, phase).

What scores the weights (`importance`). "gradient": ClickTrain's (w * dL/dw)^2 accumulated over batches (ImportanceMeter;
`average="gradient"` squares the averaged first-order term instead); "magnitude": w^2; "blend": the two, each divided
by its layer mean, summed. The default is magnitude: starting from a converged model, the gradient-based scores
chose worse masks (figures: examples/RESULTS_clicktrain.md, "Design notes").

What the soft phase does (`soft_mode`). "gradual" (default): each selection runs at a ratio that rises from patterns
alone (2.25x) to the target on a cubic (Zhu & Gupta's gradual pruning schedule) and zeroes the weights it removes;
with `regrow` (default) they keep training until the next selection, which may bring them back (soft masks, as in
soft filter pruning), so kernels are judged on the network as it adapts instead of once on the dense model; on short
fine-tunes that beats one-shot pruning and the lasso form (examples/RESULTS_clicktrain.md, "Design notes"). "lasso":
the masks are chosen at the target ratio from the start and a group lasso fades the to-be-pruned weights out (the
paper's form).

How the lasso soft phase pushes (`lasso`). "penalty": lambda * sum of group norms added to the loss (the paper's
form; goes through momentum and the gradient clip). "proximal" (default): after each optimizer step, every
to-be-pruned group's norm is decreased by its layer's step, to zero at most — the proximal step of the same group
lasso, with the step set at the first selection so the layer's median group is exactly zero when the hard masks come
on.

Cheap by construction: every per-step action is a few whole-tensor ops per layer, with masks precomputed on the
weights' device at each selection; selection itself (topk, sort) runs only at the schedule's few selection points.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

from ctprune.errors import GraphError
from ctprune.pruning.allocation import check_ratio
from ctprune.pruning.blocks import filter_blocks
from ctprune.pruning.connectivity import PATTERN_RATIO, kernel_budget
from ctprune.pruning.importance import ImportanceMeter, LazyImportance, MagnitudeImportance, magnitude_importance
from ctprune.pruning.layers import SparseTarget, mask_view
from ctprune.pruning.patterns import TAPS
from ctprune.pruning.plan import PruningPlan
from ctprune.pruning.schedule import PruningSchedule
from ctprune.pruning.selection import select_plan
from ctprune.train.hooks import TrainHooks

log = logging.getLogger(__name__)

STATE_VERSION = 1
IMPORTANCE_KINDS = ("gradient", "magnitude", "blend")
LASSO_KINDS = ("penalty", "proximal")
SOFT_MODES = ("lasso", "gradual")
DEFAULT_SOFT = {"gradual": 0.4, "lasso": 0.2}  # soft-phase fraction of the steps when none is given


def check_prunable(weights: Mapping[str, torch.Tensor], sparse: Mapping | None = None) -> None:
    """GraphError unless every weight not named in `sparse` is a (O, C, 3, 3) Conv weight."""
    if not weights:
        raise GraphError("the model has no prunable Conv (3x3, group 1, dilation 1): there is nothing to pattern-prune.")
    for name, w in weights.items():
        if sparse and name in sparse:
            if w.dim() not in (2, 4):
                raise GraphError(f"layer {name!r}: sparse pruning needs a 2-D or 4-D weight, got {tuple(w.shape)}.")
            continue
        if w.dim() != 4 or tuple(w.shape[2:]) != (3, 3):
            raise GraphError(f"Conv {name!r}: pattern pruning needs a (O, C, 3, 3) weight, got {tuple(w.shape)}.")


class ClickTrainPruner(TrainHooks):
    """Prunes {conv name: weight Parameter} to `ratio` (over these layers' weights) during training.

    patterns: library size K. spread: per-layer kept-kernel fraction stays within [u/spread, u*spread] of the mean u
    (connectivity.py). warmup / soft / reselections / lasso_lambda / importance_decay: schedule knobs (schedule.py).
    importance ("magnitude" | "gradient" | "blend"), average ("score" | "gradient"), lasso ("proximal" | "penalty"):
    see the module docstring.
    skipped {conv name: reason} and macs {conv name: MACs} pass through to the plan for the report; allocation
    ("importance" | "balanced" | "macs") splits the kept kernels between layers by importance, by importance per
    square root of multiply-adds or per multiply-add (connectivity.py), the latter two using `macs`.
    block: filters per block in the pattern layers (1: each filter alone); the blocks are clustered from the weights
    at the first selection and kept for the later ones and in the plan (pruning/blocks.py).
    """

    def __init__(
        self,
        weights: Mapping[str, torch.nn.Parameter],
        ratio: float,
        patterns: int = 8,
        *,
        spread: float = 2.5,
        warmup: float = 0.0,
        soft: float | None = None,
        reselections: int = 8,
        lasso_lambda: float | None = None,
        importance_decay: float | None = None,
        importance: str = "magnitude",
        average: str = "score",
        lasso: str = "proximal",
        skipped: Mapping[str, str] | None = None,
        macs: Mapping[str, int] | None = None,
        allocation: str = "importance",
        soft_mode: str = "gradual",
        regrow: bool = True,
        sparse: Mapping[str, SparseTarget] | None = None,
        costs: Mapping[str, float] | None = None,
        max_density: Mapping[str, float] | None = None,
        block: int = 1,
    ):
        self.sparse = dict(sparse or {})  # layers pruned in blocks (pruning/layers.py); the rest are 3x3 pattern layers
        self.costs = dict(costs or {})
        self.max_density = dict(max_density or {})  # per layer: the density above which it gains no speed
        check_prunable(weights, self.sparse)
        if soft_mode not in SOFT_MODES:
            raise ValueError(f"soft_mode must be one of {', '.join(SOFT_MODES)}, got {soft_mode!r}")
        self.soft_mode = soft_mode
        self.regrow = bool(regrow)
        self.allocation = allocation  # checked by allocate_kernels
        self.weights = dict(weights)
        self.ratio = float(ratio)
        check_reachable(self.weights, self.sparse, self.ratio)  # RatioError now, not after training
        self.patterns = int(patterns)
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"block must be a whole number of filters, at least 1, got {block!r}")
        self.block = block
        self._filter_blocks: dict[str, np.ndarray] | None = None  # pattern layers' block ids, fixed at first use
        self.spread = float(spread)
        if soft is None:
            soft = DEFAULT_SOFT[soft_mode]
        self._schedule_knobs = dict(
            warmup=warmup, soft=soft, reselections=reselections, lasso_lambda=lasso_lambda, importance_decay=importance_decay
        )
        if importance not in IMPORTANCE_KINDS:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCE_KINDS)}, got {importance!r}")
        self.importance_kind = importance
        self.average = average
        if lasso not in LASSO_KINDS:
            raise ValueError(f"lasso must be one of {', '.join(LASSO_KINDS)}, got {lasso!r}")
        self.lasso = lasso
        self._shrink: dict[str, float] = {}  # proximal lasso: per-layer group-norm decrease per soft step
        self.skipped = dict(skipped or {})
        self.macs = dict(macs or {})
        self.schedule: PruningSchedule | None = None
        self.meter = ImportanceMeter(self.weights, decay=importance_decay, average=average)
        self.plan: PruningPlan | None = None
        self.hard = False
        self.selections = 0
        self._restored = False
        self._masks: dict[str, torch.Tensor] = {}  # (O, C, 3, 3) kept-weight masks, on the weights' devices
        self._pruned_taps: dict[str, torch.Tensor] = {}  # (O, C, 9) 1 where the plan removes the weight
        self._lasso_norms: dict[str, torch.Tensor] = {}  # group norms of the last extra_loss, for the importance fix-up

    # -- TrainHooks ---------------------------------------------------------------------------------------------------

    def begin(self, total_steps: int, steps_per_epoch: int | None = None) -> None:
        if self._restored:
            if self.schedule is not None and self.schedule.total_steps != total_steps:
                log.warning(
                    "resumed pruning state was made for %d steps, this run has %d: keeping the saved schedule",
                    self.schedule.total_steps,
                    total_steps,
                )
            return
        self.schedule = PruningSchedule.from_run(total_steps, **self._schedule_knobs)
        self.meter = ImportanceMeter(self.weights, decay=self.schedule.importance_decay, average=self.average)
        s = self.schedule
        soft = (f"ratio {PATTERN_RATIO:g}x -> {self.ratio:g}x" if self.soft_mode == "gradual"
                else f"group lasso {s.lasso_lambda:.2g}")
        log.info(
            "ClickTrain schedule over %d steps: warm-up to %d, soft (%s, re-select every %d) to %d, hard masks after",
            s.total_steps, s.warmup_end, soft, s.reselect_every, s.hard_start,
        )

    def extra_loss(self, step: int) -> torch.Tensor | None:
        """Group lasso lambda * sum over to-be-pruned groups of sqrt(sum w^2), in the soft phase only.

        The groups of a kernel are its 5 dropped taps if it is kept, all 9 taps if it is removed: with the kernel's
        dropped-tap mask m (O, C, 9), both are ||w * m|| over the taps, one norm per kernel.
        """
        if (self.soft_mode != "lasso" or self.lasso != "penalty" or self.schedule is None or self.plan is None
                or self.hard or self.schedule.phase(step) != "soft"):
            self._lasso_norms = {}
            return None
        total = None
        norms = {}
        for name, w in self._pattern_weights():
            groups = w.reshape(w.shape[0], w.shape[1], TAPS) * self._pruned_taps[name]
            norm = torch.linalg.vector_norm(groups, dim=-1)
            norms[name] = norm.detach()
            term = norm.sum()
            total = term if total is None else total + term
        self._lasso_norms = norms
        return self.schedule.lasso_lambda * total

    def after_backward(self, step: int) -> None:
        if self.importance_kind == "magnitude":  # no gradient statistics needed: keep the step as cheap as dense
            return
        if self.hard or (self.schedule is not None and step >= self.schedule.hard_start):
            return
        self.meter.update(self._lasso_gradient() if self._lasso_norms else None)

    def after_step(self, step: int) -> None:
        if self.schedule is None:
            raise RuntimeError("ClickTrainPruner.begin(total_steps) must be called before training")
        if self.hard:
            self._mask_weights()
            return
        if self.plan is not None and self.schedule.phase(step) == "soft":
            if self.soft_mode == "lasso" and self.lasso == "proximal":
                self._proximal_shrink()
            elif self.soft_mode == "gradual" and not self.regrow:
                self._mask_weights()
        if step + 1 >= self.schedule.hard_start:
            self._select(final=True)
        elif self.schedule.selects_after(step):
            self._select(final=False, step=step)

    def end_epoch(self, epoch: int) -> None:
        if self.plan is not None:
            phase = "hard" if self.hard else "soft"
            log.info("epoch %d: %s masks, %.2fx over %d layers", epoch, phase, self.plan.ratio_achieved, len(self.plan.all_layers()))

    # -- without (much) training --------------------------------------------------------------------------------------

    def calibrate(self, loss_fn: Callable[[object], torch.Tensor], batches: Iterable) -> int:
        """Accumulate importance from `batches` (for --epochs 0): loss_fn(batch) -> scalar loss; returns batches used."""
        used = 0
        for batch in batches:
            for w in self.weights.values():
                w.grad = None
            loss_fn(batch).backward()
            self.meter.update()
            used += 1
        for w in self.weights.values():
            w.grad = None
        return used

    def prune_now(self) -> PruningPlan:
        """Select the final plan now and hard-mask the weights: from accumulated importance, else from magnitude."""
        self._select(final=True, install=False)
        return self.plan

    def final_plan(self) -> PruningPlan:
        """The plan the trained weights obey; selects it now if training ended before the hard phase began."""
        if not self.hard:
            self._select(final=True, install=False)
        return self.plan

    # -- resume -------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "ratio": self.ratio,
            "patterns": self.patterns,
            "block": self.block,
            "schedule": self.schedule.to_dict() if self.schedule else None,
            "meter": self.meter.state_dict(),
            "plan": self.plan.to_dict() if self.plan else None,
            "hard": self.hard,
            "selections": self.selections,
            "shrink": dict(self._shrink),
        }

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"pruning state version {state.get('version')} is not {STATE_VERSION}")
        block = int(state.get("block", 1))
        if float(state["ratio"]) != self.ratio or int(state["patterns"]) != self.patterns or block != self.block:
            saved_blocks, blocks = ((f" in blocks of {block} filters", f" in blocks of {self.block}")
                                    if block != self.block else ("", ""))
            raise ValueError(
                f"the checkpoint pruned to {state['ratio']}x with {state['patterns']} patterns{saved_blocks}; this run "
                f"asks for {self.ratio}x with {self.patterns}{blocks}"
            )
        self.schedule = PruningSchedule(**state["schedule"]) if state["schedule"] else None
        self.meter = ImportanceMeter(self.weights, decay=self.schedule.importance_decay if self.schedule else None,
                                     average=self.average)
        self.meter.load_state_dict(state["meter"])
        self.hard = bool(state["hard"])
        self.selections = int(state["selections"])
        self._shrink = {n: float(v) for n, v in state.get("shrink", {}).items()}
        self.plan = PruningPlan.from_dict(state["plan"]) if state["plan"] else None
        if self.plan is not None:
            if self.block > 1:  # the blocks the saved selections used
                self._filter_blocks = {n: l.blocks for n, l in self.plan.layers.items() if l.blocks is not None}
            self._install_masks()
        self._restored = True

    # -- internals ----------------------------------------------------------------------------------------------------

    def _ramp_ratio(self, step: int) -> float:
        """Gradual soft phase: the ratio of the selection after `step`, from patterns alone (2.25x) at the first
        soft selection to the target at the hard masks, the kept fraction falling as a cubic (Zhu & Gupta 2017):
        large cuts while the network still has the capacity to recover, small ones near the end."""
        s = self.schedule
        progress = min(1.0, max(0.0, (step + 1 - s.warmup_end) / max(1, s.hard_start - s.warmup_end)))
        start, end = 1.0 / PATTERN_RATIO, 1.0 / self.ratio
        return max(PATTERN_RATIO, 1.0 / (end + (start - end) * (1.0 - progress) ** 3))  # max: rounding at progress 0

    def _select(self, final: bool, step: int | None = None, install: bool = True) -> None:
        """Select patterns and kept kernels: at the target ratio, or (gradual soft phase, `step` given) on the ramp.
        install=False (a final selection no training step follows): mask the weights without keeping a float mask
        per weight for the steps."""
        importance, kind = self._importance()
        previous = self.plan
        gradual = not final and self.soft_mode == "gradual"
        layer_importance = importance
        if kind == "magnitude":  # squares of the weights in each layer's view, summed by blocks a few rows at a time
            importance = MagnitudeImportance({n: mask_view(w, self.sparse.get(n)) for n, w in self.weights.items()})
        else:
            def view(n):  # sparse layers' importance in their (O, C, T) mask view
                imp = layer_importance[n]
                return mask_view(imp.reshape(self.weights[n].shape), self.sparse[n]) if n in self.sparse else imp

            importance = LazyImportance(layer_importance, view)
        self.plan = select_plan(
            importance,
            {n: tuple(w.shape) for n, w in self.weights.items()},
            self._ramp_ratio(step) if gradual else self.ratio,
            patterns=self.patterns,
            spread=self.spread,
            skipped=self.skipped,
            importance_kind=kind,
            macs=self.macs,
            allocation=self.allocation,
            sparse=self.sparse,
            costs=self.costs,
            max_density=self.max_density,
            blocks=self._blocks(),
        )
        del importance, layer_importance  # a float per weight: freed before the masks (another each) are installed
        self.selections += 1
        if previous is not None and log.isEnabledFor(logging.DEBUG):  # comparing masks costs a pass over every layer
            log.debug("selection %d: %.1f%% of weight masks changed", self.selections, 100 * _changed(previous, self.plan))
        if install:
            self._install_masks()
        if gradual:  # the removed weights start from zero; with regrow they may train back until the next selection
            self._mask_weights()
            log.debug("gradual selection after step %d: %.2fx", step, self.plan.ratio_achieved)
        if final:
            self.hard = True
            if install:
                self._mask_weights()
            else:  # the last selection, no training step after it: the weights are masked once, layer by layer
                self.plan.apply(self.weights)
            log.info("hard masks on: %.2fx over %d layers (%s importance)", self.plan.ratio_achieved, len(self.plan.all_layers()), kind)

    def _blocks(self) -> dict[str, np.ndarray] | None:
        """The pattern layers' filter blocks: clustered from the weights at the first selection, then held so the
        re-selections (and a resumed run) choose rows for the same blocks."""
        if self.block == 1:
            return None
        if self._filter_blocks is None:
            self._filter_blocks = {n: filter_blocks(w, self.block) for n, w in self._pattern_weights()}
        return self._filter_blocks

    def _importance(self) -> tuple[dict[str, torch.Tensor], str]:
        """Accumulated (w * grad)^2; weight magnitude where no gradient was seen or it was all zero (a loss at its
        optimum, e.g. distilling a student still equal to its teacher, has zero gradient)."""
        magnitude = magnitude_importance(self.weights)
        if self.importance_kind == "magnitude":
            return magnitude, "magnitude"
        if self.meter.batches == 0:
            log.info("no gradient seen yet: choosing patterns and kernels by weight magnitude")
            return magnitude, "magnitude"
        importance = self.meter.importance()
        flat = [n for n, imp in importance.items() if not torch.any(imp > 0)]
        if len(flat) == len(importance):
            log.warning("the gradients seen were all zero: choosing patterns and kernels by weight magnitude instead")
            return magnitude, "magnitude"
        if flat:
            log.warning("zero gradient importance in %d layer(s) (%s): weight magnitude used there", len(flat), ", ".join(flat[:4]))
            importance.update({n: magnitude[n] for n in flat})
        if self.importance_kind == "blend":
            return {n: _mean_normalised(importance[n]) + _mean_normalised(magnitude[n]) for n in importance}, "blend"
        return importance, "gradient"

    def _install_masks(self) -> None:
        self._masks = {n: self.plan.layer_mask(n, w.device, w.dtype) for n, w in self.weights.items()}
        # the group lasso acts on pattern layers' kernels; sparse layers only get the masks
        self._pruned_taps = {n: 1.0 - m.reshape(m.shape[0], m.shape[1], TAPS) for n, m in self._masks.items()
                             if n not in self.sparse}

    def _proximal_shrink(self) -> None:
        """Proximal step of the group lasso: each to-be-pruned group's norm decreases by its layer's step, to 0 at most.

        The step is set at the first selection so the layer's median group reaches zero by the end of the soft phase
        (unless the task's gradient holds it up): the soft phase then ends with the pruned network nearly in place.
        """
        with torch.no_grad():
            for name, w in self._pattern_weights():
                groups = w.reshape(w.shape[0], w.shape[1], TAPS)
                pruned = self._pruned_taps[name]
                norm = torch.linalg.vector_norm(groups * pruned, dim=-1, keepdim=True)
                if name not in self._shrink:
                    soft_steps = max(1, self.schedule.hard_start - self.schedule.warmup_end)
                    self._shrink[name] = float(norm[norm > 0].median()) / soft_steps if torch.any(norm > 0) else 0.0
                factor = (1.0 - self._shrink[name] / norm.clamp_min(torch.finfo(norm.dtype).tiny)).clamp_min(0.0)
                groups.mul_(1.0 - pruned + pruned * factor)

    def _pattern_weights(self):
        return [(n, w) for n, w in self.weights.items() if n not in self.sparse]

    def _mask_weights(self) -> None:
        with torch.no_grad():
            for name, w in self.weights.items():
                w.mul_(self._masks[name])

    def _lasso_gradient(self) -> dict[str, torch.Tensor]:
        """d(extra_loss)/dw of the last extra_loss: lambda * w * m / ||w * m|| per group (0 for a zero group)."""
        lam = self.schedule.lasso_lambda
        out = {}
        with torch.no_grad():
            for name, w in self._pattern_weights():
                norm = self._lasso_norms[name].unsqueeze(-1)
                groups = w.reshape(norm.shape[0], norm.shape[1], TAPS) * self._pruned_taps[name]
                grad = torch.where(norm > 0, groups / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0) * lam
                out[name] = grad.reshape(w.shape)
        return out


def check_reachable(weights: Mapping[str, torch.Tensor], sparse: Mapping[str, SparseTarget], ratio: float) -> None:
    """RatioError (naming the largest reachable ratio) when no allocation can reach `ratio`: every filter keeps at
    least one 4-weight kernel, every sparse output channel at least one weight."""
    if not sparse:
        kernel_budget({n: (w.shape[0], w.shape[1]) for n, w in weights.items()}, ratio)
        return
    from ctprune.errors import RatioError

    check_ratio(ratio)
    total = sum(w.numel() for w in weights.values())
    floor = sum(mask_view(w, sparse.get(n)).shape[0] * (1 if n in sparse else 4) for n, w in weights.items())
    largest = total / floor
    if ratio > largest * (1 + 1e-9):
        raise RatioError(
            f"a {ratio:g}x ratio cannot be reached: with every output channel keeping at least one weight (one 4-weight "
            f"kernel in 3x3 pattern layers), the largest reachable ratio over these {len(weights)} layers is "
            f"{math.floor(largest * 100) / 100:g}x.")


def _mean_normalised(score: torch.Tensor) -> torch.Tensor:
    mean = score.mean()
    return score / mean if mean > 0 else score


def _changed(before: PruningPlan, after: PruningPlan) -> float:
    """Fraction of weights whose kept/removed state differs between two plans of the same layers."""
    changed = total = 0
    for name, layer in after.layers.items():
        a, b = before.layer_mask(name), after.layer_mask(name)
        changed += int((a != b).sum())
        total += a.numel()
    return changed / max(total, 1)
