"""When ClickTrain does what, in optimizer steps (0-based global step of the batch being trained).

    [0, warmup_end)            warm-up: dense training, importance accumulates
    at warmup_end              first selection of patterns and kept kernels
    [warmup_end, hard_start)   soft phase: group lasso on the to-be-pruned weights; re-selection every reselect_every steps
    at hard_start              final selection; weights are masked
    [hard_start, total)        hard masks after every optimizer step: fine-tuning of the pruned network

Defaults from the run's length: no warm-up (the first selection scores weights by magnitude, which needs no gradient
statistics; gradient importance wants a warm-up, e.g. warmup=0.05), soft 20%, hard masks for the last 80%; 8
re-selections in the soft phase (ClickTrainPruner's default gradual soft phase asks for 40%: its ratio ramps over
it). Short fine-tunes need most of their steps under the final masks: on a Fashion-MNIST VGG at 8x with 3 epochs, a
10/40/50 split ended 0.6-0.7 points below a 5/25/70 one (noisy CPU run, 2,000 test images).

Group-lasso strength. The authors' configs use lambda ~2e-4 (1.5e-4..2.5e-4) over soft phases of about 15,000 steps
(40 CIFAR epochs). A group's norm shrinks by lr * lambda per step, so a short fine-tune gets lambda scaled by
15,000 / soft steps (at most 100x) to push as far in its fewer steps; `lasso_lambda` sets it outright. This lambda is
for the penalty form (ClickTrainPruner(lasso="penalty")); the default proximal form sets its own per-layer step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

PAPER_LAMBDA = 2e-4
PAPER_SOFT_STEPS = 15_000
MAX_LAMBDA_SCALE = 100.0


@dataclass(frozen=True)
class PruningSchedule:
    total_steps: int
    warmup_end: int
    hard_start: int
    reselect_every: int
    lasso_lambda: float
    importance_decay: float | None

    @classmethod
    def from_run(
        cls,
        total_steps: int,
        warmup: float = 0.0,
        soft: float = 0.2,
        reselections: int = 8,
        lasso_lambda: float | None = None,
        importance_decay: float | None = None,
    ) -> "PruningSchedule":
        """Defaults for a run of `total_steps` optimizer steps; warmup and soft are fractions of it."""
        if total_steps < 1:
            raise ValueError(f"a pruning schedule needs at least one training step, got {total_steps}")
        if not (0 <= warmup and 0 <= soft and warmup + soft <= 1):
            raise ValueError(f"warmup ({warmup}) and soft ({soft}) must be fractions summing to at most 1")
        hard_start = min(total_steps, max(1, round((warmup + soft) * total_steps)))
        warmup_end = min(hard_start, max(1, round(warmup * total_steps)))
        soft_steps = hard_start - warmup_end
        reselect_every = max(1, soft_steps // max(1, reselections))
        if lasso_lambda is None:
            scale = min(MAX_LAMBDA_SCALE, max(1.0, PAPER_SOFT_STEPS / max(1, soft_steps)))
            lasso_lambda = PAPER_LAMBDA * scale
        if importance_decay is None:
            # An EMA whose horizon spans one re-selection interval: recent batches matter as the soft phase moves weights.
            importance_decay = 1.0 - 1.0 / max(10, reselect_every)
        return cls(total_steps, warmup_end, hard_start, reselect_every, float(lasso_lambda), importance_decay)

    def phase(self, step: int) -> str:
        if step < self.warmup_end:
            return "warmup"
        if step < self.hard_start:
            return "soft"
        return "hard"

    def selects_after(self, step: int) -> bool:
        """Whether patterns and kept kernels are (re-)selected once step `step` is done (not counting the final one)."""
        done = step + 1
        if done < self.warmup_end or done >= self.hard_start:
            return False
        return (done - self.warmup_end) % self.reselect_every == 0

    def to_dict(self) -> dict:
        return asdict(self)
