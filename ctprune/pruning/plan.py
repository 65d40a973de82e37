"""PruningPlan: per pruned Conv, which pattern each kernel keeps and which kernels are removed. One object, three readers:
training applies its masks, the rewriter consumes `layer_patterns()`, the report describes it (`layer_report()`, `totals()`).

A layer's `assignment` is (O, C) int: the id of the network library pattern kernel (o, c) keeps, or -1 when connectivity
pruning removed the whole kernel. The plan serialises to plain JSON types (`to_dict` / `from_dict`) for checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from ctprune.pruning.patterns import KEEP, TAPS, PatternLibrary, pattern_onehot
from ctprune.rewrite.pattern_conv import LayerPatterns  # the rewriter owns the type it consumes

REMOVED = -1


@dataclass
class PlanLayer:
    """One pruned Conv: dense weight shape (O, C, 3, 3) and the pattern id per kernel (-1 = removed)."""

    weight_shape: tuple[int, int, int, int]
    assignment: np.ndarray  # (O, C) int64
    macs: int | None = None  # dense multiply-adds per sample, when the caller knows them

    @property
    def weights_before(self) -> int:
        return int(np.prod(self.weight_shape))

    @property
    def kept_kernels(self) -> int:
        return int((self.assignment != REMOVED).sum())

    @property
    def weights_after(self) -> int:
        return KEEP * self.kept_kernels

    @property
    def kept_fraction(self) -> float:
        return self.kept_kernels / self.assignment.size


@dataclass
class PruningPlan:
    library: PatternLibrary
    layers: dict[str, PlanLayer]
    ratio_target: float
    skipped: dict[str, str] = field(default_factory=dict)  # conv name -> why it stays dense
    importance: str = "gradient"  # what chose the plan: "gradient" ((w*dL/dw)^2) or "magnitude" (w^2)

    @classmethod
    def from_selection(
        cls,
        library: PatternLibrary,
        assignments: Mapping[str, torch.Tensor],
        keep: Mapping[str, torch.Tensor],
        weight_shapes: Mapping[str, tuple[int, ...]],
        ratio_target: float,
        skipped: Mapping[str, str] | None = None,
        importance: str = "gradient",
        macs: Mapping[str, int] | None = None,
    ) -> "PruningPlan":
        layers = {}
        for name, ids in assignments.items():
            a = ids.detach().cpu().numpy().astype(np.int64).copy()
            a[~keep[name].detach().cpu().numpy()] = REMOVED
            layers[name] = PlanLayer(tuple(int(d) for d in weight_shapes[name]), a, (macs or {}).get(name))
        return cls(library, layers, float(ratio_target), dict(skipped or {}), importance)

    # -- training reads masks ---------------------------------------------------------------------------------------

    def masks(self, device=None, dtype=torch.float32) -> dict[str, torch.Tensor]:
        """{layer: (O, C, 3, 3) 0/1 tensor}: 1 where the plan keeps the weight."""
        return {name: self.layer_mask(name, device, dtype) for name in self.layers}

    def layer_mask(self, name: str, device=None, dtype=torch.float32) -> torch.Tensor:
        layer = self.layers[name]
        rows = pattern_onehot(self.library.patterns, device=device, dtype=dtype).T  # (P, 9)
        rows = torch.cat([rows, torch.zeros(1, TAPS, device=device, dtype=dtype)])  # row -1: removed kernel
        return rows[torch.as_tensor(layer.assignment, device=device)].reshape(layer.weight_shape)

    def apply(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Zero every weight the plan removes, in place."""
        with torch.no_grad():
            for name, w in weights.items():
                if name in self.layers:
                    w.mul_(self.layer_mask(name, w.device, w.dtype))

    # -- the rewriter reads layer patterns ----------------------------------------------------------------------------

    def layer_patterns(self) -> dict:
        """{conv name: LayerPatterns} with each layer's library cut to the patterns it uses (ids re-numbered 0..P-1)."""
        out = {}
        for name, layer in self.layers.items():
            used = np.unique(layer.assignment[layer.assignment != REMOVED])
            remap = np.full(len(self.library) + 1, REMOVED, dtype=np.int64)
            remap[used] = np.arange(len(used))
            # index -1 reads remap[-1] = REMOVED, so removed kernels stay removed
            out[name] = LayerPatterns(
                library=self.library.patterns[used].copy(), assignment=remap[layer.assignment]
            )
        return out

    # -- the report reads totals and layers --------------------------------------------------------------------------

    def layer_report(self) -> list[dict]:
        rows = []
        for name, layer in self.layers.items():
            o, c, kh, kw = layer.weight_shape
            used = np.unique(layer.assignment[layer.assignment != REMOVED])
            rows.append(
                {
                    "name": name,
                    "op": "PatternConv",
                    "kernel": [kh, kw],
                    "in_channels": c,
                    "out_channels": o,
                    "weights_before": layer.weights_before,
                    "weights_after": layer.weights_after,
                    "pattern_count": int(len(used)),
                    "kept_kernel_fraction": round(layer.kept_fraction, 6),
                }
            )
            if layer.macs is not None:  # multiply-adds scale with the weights kept
                rows[-1]["macs_before"] = int(layer.macs)
                rows[-1]["macs_after"] = int(round(layer.macs * layer.weights_after / layer.weights_before))
        return rows

    def totals(self) -> dict:
        before = sum(layer.weights_before for layer in self.layers.values())
        after = sum(layer.weights_after for layer in self.layers.values())
        return {
            "conv_weights": {"before": before, "after": after},
            "ratio_target": self.ratio_target,
            "ratio_achieved": before / after if after else math.inf,
            "patterns": len(self.library),
            "importance": self.importance,
            "dense_layers": dict(self.skipped),
        }

    @property
    def ratio_achieved(self) -> float:
        return self.totals()["ratio_achieved"]

    # -- checkpoints --------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "library": self.library.to_list(),
            "ratio_target": self.ratio_target,
            "skipped": dict(self.skipped),
            "importance": self.importance,
            "layers": {
                name: {"weight_shape": list(l.weight_shape), "assignment": l.assignment.tolist(), "macs": l.macs}
                for name, l in self.layers.items()
            },
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "PruningPlan":
        layers = {
            name: PlanLayer(tuple(l["weight_shape"]), np.asarray(l["assignment"], dtype=np.int64), l.get("macs"))
            for name, l in d["layers"].items()
        }
        return cls(PatternLibrary(np.asarray(d["library"])), layers, float(d["ratio_target"]), dict(d.get("skipped", {})), d.get("importance", "gradient"))
