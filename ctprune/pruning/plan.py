"""PruningPlan: per pruned layer, which weights it keeps. One object, three readers: training applies its masks, the
rewriter consumes `layer_patterns()` and `sparse`, the report describes it (`layer_report()`, `totals()`).

A pattern layer's `assignment` is (O, C) int: the id of the network library pattern kernel (o, c) keeps, or -1 when
connectivity pruning removed the whole kernel; with `--block N` its `blocks` (O,) give each filter's block, and the
filters of a block hold the same assignment row (pruning/blocks.py). A sparse layer's `keep` is (blocks, C * T) bool: which input positions
(input channel x tap; FC: input feature) each block of `block` consecutive output channels keeps. The plan
serialises to plain JSON types (`to_dict` / `from_dict`) for checkpoints.
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
    blocks: np.ndarray | None = None  # (O,) int64 block id per filter (--block N); None: filters stand alone

    @property
    def block(self) -> int:
        """Filters per block (the largest block's): 1 without blocks."""
        return 1 if self.blocks is None else int(np.bincount(self.blocks).max())

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
class SparseLayer:
    """One layer pruned in blocks: its stored weight shape, block size, orientation and (blocks, C * T) kept mask."""

    weight_shape: tuple[int, ...]
    block: int
    transposed: bool  # stored weight (I, O): the mask view is its transpose
    keep: np.ndarray  # (ceil(O / block), C * T) bool
    macs: int | None = None
    kind: str = "conv"  # "conv" or "fc"
    out_channels: int = 0

    @property
    def weights_before(self) -> int:
        return int(np.prod(self.weight_shape))

    @property
    def weights_after(self) -> int:
        rows = np.full(self.keep.shape[0], self.block)
        rows[-1] = self.out_channels - self.block * (self.keep.shape[0] - 1)
        return int((self.keep.sum(1) * rows).sum())

    def view_mask(self) -> np.ndarray:
        """(O, C * T) 0/1 float32: the mask in the (output channel, input position) view."""
        return np.repeat(self.keep, self.block, axis=0)[: self.out_channels].astype(np.float32)

    def mask(self) -> np.ndarray:
        """The 0/1 float32 mask in the stored weight's own shape."""
        m = self.view_mask()
        return np.ascontiguousarray(m.T) if self.transposed else m.reshape(self.weight_shape)

    def kept_mask(self) -> np.ndarray:
        """The bool mask in the stored weight's own shape (a transposed view for a transposed layer): a quarter of
        `mask()`'s memory, and no copy for the transpose."""
        m = np.repeat(self.keep, self.block, axis=0)[: self.out_channels]
        return m.T if self.transposed else m.reshape(self.weight_shape)

    def zero_removed(self, weight: torch.Tensor) -> None:
        """Zero the removed weights of `weight` (the stored tensor) in place, block by block through views: no mask
        in the weight's shape (a float one, transposed for an FC layer stored (I, O), would hold two more copies
        of a 400 MB layer)."""
        view = weight.t() if self.transposed else weight.reshape(weight.shape[0], -1)  # (O, C * T)
        removed = ~torch.from_numpy(self.keep).to(weight.device)  # (blocks, C * T)
        full = self.out_channels // self.block
        if full:
            view[: full * self.block].view(full, self.block, -1).masked_fill_(removed[:full, None, :], 0.0)
        if self.out_channels % self.block:
            view[full * self.block:].masked_fill_(removed[full][None, :], 0.0)

    def to_dict(self) -> dict:
        return {"weight_shape": list(self.weight_shape), "block": self.block, "transposed": self.transposed,
                "keep": np.packbits(self.keep, axis=1).tolist(), "columns": int(self.keep.shape[1]),
                "macs": self.macs, "kind": self.kind, "out_channels": self.out_channels}

    @classmethod
    def from_dict(cls, d: Mapping) -> "SparseLayer":
        keep = np.unpackbits(np.asarray(d["keep"], dtype=np.uint8), axis=1, count=int(d["columns"])).astype(bool)
        return cls(tuple(d["weight_shape"]), int(d["block"]), bool(d["transposed"]), keep, d.get("macs"),
                   d.get("kind", "conv"), int(d["out_channels"]))


@dataclass
class PruningPlan:
    library: PatternLibrary
    layers: dict[str, PlanLayer]
    ratio_target: float
    skipped: dict[str, str] = field(default_factory=dict)  # layer name -> why it stays dense
    importance: str = "gradient"  # what chose the plan: "gradient" ((w*dL/dw)^2) or "magnitude" (w^2)
    sparse: dict[str, SparseLayer] = field(default_factory=dict)  # layers pruned in blocks (1x1, kxk, FC)

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
        blocks: Mapping[str, np.ndarray] | None = None,
    ) -> "PruningPlan":
        layers = {}
        for name, ids in assignments.items():
            a = ids.detach().cpu().numpy().astype(np.int64).copy()
            a[~keep[name].detach().cpu().numpy()] = REMOVED
            b = (blocks or {}).get(name)
            layers[name] = PlanLayer(tuple(int(d) for d in weight_shapes[name]), a, (macs or {}).get(name),
                                     None if b is None else np.asarray(b, dtype=np.int64).copy())
        return cls(library, layers, float(ratio_target), dict(skipped or {}), importance)

    # -- training reads masks ---------------------------------------------------------------------------------------

    def masks(self, device=None, dtype=torch.float32) -> dict[str, torch.Tensor]:
        """{layer: (O, C, 3, 3) 0/1 tensor}: 1 where the plan keeps the weight."""
        return {name: self.layer_mask(name, device, dtype) for name in self.all_layers()}

    def all_layers(self) -> list[str]:
        return list(self.layers) + list(self.sparse)

    def layer_mask(self, name: str, device=None, dtype=torch.float32) -> torch.Tensor:
        if name in self.sparse:
            return torch.as_tensor(self.sparse[name].mask(), device=device, dtype=dtype)
        layer = self.layers[name]
        rows = pattern_onehot(self.library.patterns, device=device, dtype=dtype).T  # (P, 9)
        rows = torch.cat([rows, torch.zeros(1, TAPS, device=device, dtype=dtype)])  # row -1: removed kernel
        return rows[torch.as_tensor(layer.assignment, device=device)].reshape(layer.weight_shape)

    def apply(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Zero every weight the plan removes, in place."""
        with torch.no_grad():
            for name, w in weights.items():
                if name in self.sparse:
                    self.sparse[name].zero_removed(w)
                elif name in self.layers:
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
                library=self.library.patterns[used].copy(), assignment=remap[layer.assignment], blocks=layer.blocks
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
                    "form": "pattern",
                }
            )
            if layer.blocks is not None:  # filters that share every kernel (--block N)
                rows[-1]["block"] = layer.block
            _add_macs(rows[-1], layer)
        for name, layer in self.sparse.items():
            shape = layer.weight_shape
            out_c = layer.out_channels
            in_c = (shape[0] if layer.transposed else shape[1]) if layer.kind == "fc" else shape[1]
            rows.append({
                "name": name,
                "op": "SparseConv",
                "kernel": list(shape[2:]) if layer.kind == "conv" else [],
                "in_channels": int(in_c),
                "out_channels": int(out_c),
                "weights_before": layer.weights_before,
                "weights_after": layer.weights_after,
                "pattern_count": 0,
                "block": layer.block,
                "form": "sparse",
                "kind": layer.kind,
            })
            _add_macs(rows[-1], layer)
        return rows

    def totals(self) -> dict:
        every = list(self.layers.values()) + list(self.sparse.values())
        before = sum(layer.weights_before for layer in every)
        after = sum(layer.weights_after for layer in every)
        return {
            "conv_weights": {"before": before, "after": after},
            "ratio_target": self.ratio_target,
            "ratio_achieved": before / after if after else math.inf,
            "patterns": len(self.library),
            "importance": self.importance,
            "dense_layers": dict(self.skipped),
            "by_form": self.totals_by_form(),
        }

    def totals_by_form(self) -> dict:
        """{"pattern 3x3" | "sparse conv" | "sparse fc": {layers, before, after}}."""
        out: dict[str, dict] = {}
        kinds = [("pattern 3x3", l) for l in self.layers.values()] + [(f"sparse {l.kind}", l) for l in self.sparse.values()]
        for kind, layer in kinds:
            row = out.setdefault(kind, {"layers": 0, "before": 0, "after": 0})
            row["layers"] += 1
            row["before"] += layer.weights_before
            row["after"] += layer.weights_after
        return out

    @property
    def ratio_achieved(self) -> float:
        return self.totals()["ratio_achieved"]

    # -- the plan interface the report reads (CropPlan has the same three) ---------------------------------------

    def report_layers(self) -> list[dict]:
        return self.layer_report()

    def weight_totals(self) -> dict:
        """{"before", "after", "by_form"}: the pruned layers' weights."""
        totals = self.totals()
        return dict(totals["conv_weights"], by_form=totals["by_form"])

    def dense_layers(self) -> dict[str, str]:
        return dict(self.skipped)

    # -- checkpoints --------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "library": self.library.to_list(),
            "ratio_target": self.ratio_target,
            "skipped": dict(self.skipped),
            "importance": self.importance,
            "layers": {name: _layer_dict(l) for name, l in self.layers.items()},
            "sparse": {name: l.to_dict() for name, l in self.sparse.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "PruningPlan":
        layers = {
            name: PlanLayer(tuple(l["weight_shape"]), np.asarray(l["assignment"], dtype=np.int64), l.get("macs"),
                            None if l.get("blocks") is None else np.asarray(l["blocks"], dtype=np.int64))
            for name, l in d["layers"].items()
        }
        library = PatternLibrary(np.asarray(d["library"])) if len(d["library"]) else PatternLibrary.empty()
        sparse = {name: SparseLayer.from_dict(l) for name, l in d.get("sparse", {}).items()}
        return cls(library, layers, float(d["ratio_target"]), dict(d.get("skipped", {})),
                   d.get("importance", "gradient"), sparse)


def _layer_dict(layer: PlanLayer) -> dict:
    d = {"weight_shape": list(layer.weight_shape), "assignment": layer.assignment.tolist(), "macs": layer.macs}
    if layer.blocks is not None:
        d["blocks"] = layer.blocks.tolist()
    return d


def _add_macs(row: dict, layer) -> None:
    if layer.macs is not None:  # multiply-adds scale with the weights kept
        row["macs_before"] = int(layer.macs)
        row["macs_after"] = int(round(layer.macs * layer.weights_after / layer.weights_before))
