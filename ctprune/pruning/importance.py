"""Weight importance (w * dL/dw)^2, accumulated over many batches (ClickTrain's "accurate importance estimation").

One batch gives a noisy estimate; the meter keeps, per layer, an exponential moving average over batches (with bias
correction, so it is exact after one batch too) or, with decay=None, the plain mean of every batch since the last reset.
Each update is a handful of element-wise ops per layer on tensors already on the device: no Python loop over kernels.

Shapes: a layer's weight is (O, C, 3, 3); the meter stores (O, C, 9) so patterns index taps directly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

# "score": the mean of per-batch (w * g)^2; "gradient": (w * mean g)^2, the square of the averaged first-order term.
AVERAGES = ("score", "gradient")

class ImportanceMeter:
    """Per-layer running estimate of (w * grad)^2.

    >>> w = torch.nn.Parameter(torch.ones(1, 1, 3, 3)); w.grad = torch.full_like(w, 2.0)
    >>> m = ImportanceMeter({"conv": w}); m.update(); m.importance()["conv"][0, 0, 0].item()
    4.0
    """

    def __init__(self, weights: Mapping[str, torch.nn.Parameter], decay: float | None = None, average: str = "score"):
        if decay is not None and not 0.0 <= decay < 1.0:
            raise ValueError(f"importance decay must be in [0, 1) or None, got {decay}")
        if average not in AVERAGES:
            raise ValueError(f"importance average must be one of {', '.join(AVERAGES)}, got {average!r}")
        self.weights = dict(weights)
        self.decay = decay
        self.average = average
        self.reset()

    def reset(self) -> None:
        self.batches = 0
        self._sums: dict[str, torch.Tensor] = {}  # made at a layer's first update: --epochs 0 by magnitude needs none
        self._weight_total = 0.0  # EMA bias correction: sum of the weights given to batches so far

    def update(self, grad_correction: Mapping[str, torch.Tensor] | None = None) -> None:
        """Add one batch from each weight's current .grad; grad_correction {layer: tensor like the weight} is
        subtracted first (the group-lasso term's own gradient, which is not the task's)."""
        with torch.no_grad():
            if self.decay is None:
                keep, new = 1.0, 1.0
            else:
                keep, new = self.decay, 1.0 - self.decay
            for name, w in self.weights.items():
                if keep != 1.0 and name in self._sums:
                    self._sums[name].mul_(keep)  # every layer ages alike, so one bias correction fits all
                if w.grad is None:  # no gradient reached this layer in this batch: it scores zero
                    continue
                g = w.grad
                if grad_correction is not None and name in grad_correction:
                    g = g - grad_correction[name]
                score = (w.detach() * g).float().reshape(_kernels_shape(w))
                if self.average == "score":
                    score = score.square_()
                self._sum(name).add_(score, alpha=new)
            self._weight_total = self._weight_total * keep + new
            self.batches += 1

    def importance(self) -> dict[str, torch.Tensor]:
        """{layer: (O, C, 9)} mean (decay=None) or bias-corrected EMA; zeros before the first update."""
        scale = 1.0 / self._weight_total if self._weight_total > 0 else 0.0
        sums = {name: self._sum(name) for name in self.weights}
        if self.average == "gradient":
            return {name: (s * scale).square() for name, s in sums.items()}
        return {name: s * scale for name, s in sums.items()}

    def _sum(self, name: str) -> torch.Tensor:
        if name not in self._sums:
            w = self.weights[name]
            self._sums[name] = torch.zeros(_kernels_shape(w), dtype=torch.float32, device=w.device)
        return self._sums[name]

    def state_dict(self) -> dict:
        return {
            "batches": self.batches,
            "weight_total": self._weight_total,
            "decay": self.decay,
            "average": self.average,
            "sums": {name: self._sum(name).detach().cpu().clone() for name in self.weights},
        }

    def load_state_dict(self, state: Mapping) -> None:
        missing = set(self.weights) ^ set(state["sums"])
        if missing:
            raise ValueError(f"importance state does not match the layers being pruned: {sorted(missing)}")
        self.batches = int(state["batches"])
        self._weight_total = float(state["weight_total"])
        self.decay = state["decay"]
        self.average = state.get("average", "score")
        for name, s in state["sums"].items():
            self._sum(name).copy_(s)


class LazyImportance(Mapping):
    """{layer: importance} computed each time a layer is read, never kept: a reader that takes one layer at a time
    holds one layer's float per weight, not the whole model's (VGG-19's FC layers: 480 MB)."""

    def __init__(self, names, compute: Callable[[str], torch.Tensor]):
        self._names = list(names)
        self._compute = compute

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._compute(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class MagnitudeImportance(LazyImportance):
    """w^2 per layer, computed when read, of {layer: weight in an (O, C, T) view}; `block_sums` adds it up over
    blocks of output channels a few rows at a time, never holding a whole layer's squares."""

    CHUNK_ELEMENTS = 1 << 22  # rows squared at once: ~16 MB of float32

    def __init__(self, views: Mapping[str, torch.Tensor]):
        self.views = dict(views)
        super().__init__(self.views, self._square)

    def _square(self, name: str) -> torch.Tensor:
        with torch.no_grad():
            return self.views[name].detach().float().square()

    def block_sums(self, name: str, block: int) -> torch.Tensor:
        """(ceil(O / block), C * T): w^2 summed over each block of `block` consecutive output channels."""
        view = self.views[name].detach()
        o = view.shape[0]
        per_row = max(1, view[0].numel())
        step = block * max(1, self.CHUNK_ELEMENTS // (per_row * block))
        sums = torch.empty((-(-o // block), per_row), dtype=torch.float32, device=view.device)
        with torch.no_grad():
            for start in range(0, o, step):
                rows = view[start:start + step].float().square().reshape(-1, per_row)
                pad = (-len(rows)) % block
                if pad:
                    rows = torch.cat([rows, rows.new_zeros(pad, per_row)])
                sums[start // block:start // block + len(rows) // block] = rows.reshape(-1, block, per_row).sum(1)
        return sums


def magnitude_importance(weights: Mapping[str, torch.Tensor]) -> MagnitudeImportance:
    """{layer: (O, C, 9)} w^2: the importance when no gradient is available (prune-after baseline, --epochs 0)."""
    return MagnitudeImportance({name: w.reshape(_kernels_shape(w)) for name, w in weights.items()})


def _kernels_shape(w: torch.Tensor) -> tuple[int, int, int]:
    """(O, C, taps) of a Conv weight; an FC weight (2-D, in its stored orientation) as (d0, d1, 1)."""
    taps = 1
    for d in w.shape[2:]:
        taps *= d
    return (w.shape[0], w.shape[1], taps)
