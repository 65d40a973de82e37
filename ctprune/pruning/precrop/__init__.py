"""PreCropping: crop whole channels to the layer-wise densities of pruning-at-initialization.

    plan = plan_crop(model, ratio=4, pai="synflow-macs")  # groups, densities, kept channels per group
    plan.ratio_achieved, plan.report_layers()
    smaller = apply_crop(model, plan)                      # standard ONNX ops, smaller Conv/BN/Gemm constants

Pieces, one job each: groups.py (channel groups on the ONNX graph), densities.py (PAI layer-wise densities),
solve.py (joint kept-channel counts, rounded to a channel multiple), crop.py (the graph surgery).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx

from ctprune.errors import RatioError
from ctprune.pruning.precrop.crop import crop_model
from ctprune.pruning.precrop.densities import PAI_METHODS, Densities, layer_densities
from ctprune.pruning.precrop.groups import ChannelGraph, ChannelGroup, ConstantTable, channel_graph
from ctprune.pruning.precrop.solve import solve_keep_counts, weight_model

__all__ = ["plan_crop", "apply_crop", "CropPlan", "channel_graph", "ChannelGroup", "PAI_METHODS"]

log = logging.getLogger(__name__)


@dataclass
class CropPlan:
    """Which channels of every group stay, and why (densities), for one model."""

    ratio_target: float
    pai: str
    channel_multiple: int
    keep: dict[str, np.ndarray]  # group key → sorted kept channel indices
    densities: dict[str, float]  # Conv node → density the PAI method gives it
    channels: ChannelGraph = field(repr=False)
    notes: list[str] = field(default_factory=list)

    def _conv_weights(self) -> tuple[int, int]:
        wm = weight_model(self.channels)
        counts = np.array([len(self.keep[k]) for k in wm.keys], dtype=np.float64)
        return int(wm.weights(wm.sizes).sum()), int(round(wm.weights(counts).sum()))

    @property
    def conv_weights(self) -> dict[str, int]:
        before, after = self._conv_weights()
        return {"before": before, "after": after}

    @property
    def ratio_achieved(self) -> float:
        before, after = self._conv_weights()
        return before / after

    @property
    def groups(self) -> dict[str, ChannelGroup]:
        return self.channels.groups

    def report_layers(self) -> list[dict]:
        """Per weight layer: channels before/after, weights before/after, the density targeted and achieved."""
        rows = []
        cg = self.channels
        for layer in cg.layers:
            c_in, c_out = layer.in_layout.features, layer.out_layout.features
            k_in = len(cg.kept_features(layer.in_layout, self.keep))
            k_out = len(cg.kept_features(layer.out_layout, self.keep))
            if layer.op == "Conv" and layer.depthwise:
                before, after = layer.kernel * c_out, layer.kernel * k_out
            elif layer.op == "Conv":
                before = layer.kernel * c_in * c_out // layer.group
                after = layer.kernel * k_in * k_out // layer.group
            else:
                before, after = c_in * c_out, k_in * k_out
            target = self.densities.get(layer.name)
            note = f"channels {c_in}->{k_in} in, {c_out}->{k_out} out; density " + (
                f"{target:.2f} asked, " if target is not None else "") + f"{after / before:.2f} kept"
            rows.append({
                "name": layer.name, "op": layer.op, "kernel": list(layer.kernel_shape),
                "in_channels": k_in, "out_channels": k_out, "in_channels_before": c_in, "out_channels_before": c_out,
                "weights_before": before, "weights_after": after, "pattern_count": None,
                "density_target": target, "density_achieved": after / before, "note": note,
            })
        return rows

    def to_dict(self) -> dict:
        """JSON-ready summary (the report's `precrop` section)."""
        return {
            "pai": self.pai, "ratio_target": self.ratio_target, "ratio_achieved": self.ratio_achieved,
            "channel_multiple": self.channel_multiple, "conv_weights": self.conv_weights,
            "groups": [{"key": g.key, "size": g.size, "kept": len(self.keep[g.key]), "frozen": g.frozen}
                       for g in self.channels.groups.values()],
            "layers": self.report_layers(), "notes": list(self.notes),
        }


def plan_crop(model: onnx.ModelProto, ratio: float, pai: str = "synflow-macs", data: np.ndarray | None = None,
              channel_multiple: int = 8, pretrained: bool = True, seed: int = 0) -> CropPlan:
    """Solve which channels to keep so the Conv weights shrink `ratio`-fold, layer by layer as `pai` would prune.

    `data`: a few inputs (float32, the model's layout) for SNIP/GraSP; SynFlow/ERK/uniform need none.
    `pretrained`: keep the most important channels (PAI scores, else |w|); False keeps the first ones (they will be
    re-initialised anyway).
    """
    if not isinstance(channel_multiple, int) or channel_multiple < 1:
        raise RatioError(f"--channel-multiple must be a positive integer, got {channel_multiple!r}")
    if not ratio > 1:
        raise RatioError(f"the compression ratio must be a number > 1, got {ratio!r}")
    model = _with_constant_weights(model)
    cg = channel_graph(model)
    frozen = [g for g in cg.groups.values() if g.frozen]
    notes = [f"{g.describe()} kept whole: {g.frozen}" for g in frozen]
    for note in notes:
        log.info("precrop: %s", note)
    dens = layer_densities(model, cg, ratio, pai, data, seed)
    counts = solve_keep_counts(cg, dens.by_layer, ratio, channel_multiple, macs_per_weight=dens.macs_per_weight)
    importance = _channel_importance(model, cg, dens) if pretrained else None
    keep = {}
    for key, group in cg.groups.items():
        k = counts[key]
        if importance is None or k == group.size:
            keep[key] = np.arange(k, dtype=np.int64)
        else:
            keep[key] = np.sort(np.argsort(-importance[key], kind="stable")[:k]).astype(np.int64)
    plan = CropPlan(float(ratio), pai, channel_multiple, keep, dens.by_layer, cg, notes + dens.notes)
    log.info("precrop plan: %s densities, %.2fx conv-weight ratio (target %.2fx)", pai, plan.ratio_achieved, ratio)
    return plan


def apply_crop(model: onnx.ModelProto, plan: CropPlan) -> onnx.ModelProto:
    """A new model with only the planned channels: smaller standard Conv/BN/Gemm constants, same graph inputs/outputs."""
    model = _with_constant_weights(model)
    return crop_model(model, plan.keep, channel_graph(model))


def _with_constant_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model itself, or, when some Conv/Gemm weight is computed by the graph (e.g. ConstantOfShape placeholders
    in the onnx backend-test models), its constant-folded form (ctprune.graph.normalize) — cropping needs constants."""
    consts = ConstantTable(model.graph)
    computed = [n.input[1] for n in model.graph.node
                if n.op_type in ("Conv", "Gemm") and len(n.input) > 1 and n.input[1] not in consts]
    if not computed:
        return model
    from ctprune.graph import normalize

    log.info("precrop: %d weights (e.g. %r) are computed by the graph; folding constants first", len(computed),
             computed[0])
    return normalize(model)


def _channel_importance(model: onnx.ModelProto, cg: ChannelGraph, dens: Densities) -> dict[str, np.ndarray]:
    """Per group, per channel: the sum over every weight that reads or writes the channel of its normalised score
    (PAI scores where the method has them, else |w|)."""
    consts = ConstantTable(model.graph)
    layer_weights = {l.weight for l in cg.layers}
    total = {key: np.zeros(g.size) for key, g in cg.groups.items()}
    for s in cg.slices:
        if s.const not in layer_weights:
            continue
        if dens.scores is not None and s.const in dens.scores:
            score = np.abs(dens.scores[s.const])
        else:
            score = np.abs(consts.get(s.const).astype(np.float64))
        axes = tuple(a for a in range(score.ndim) if a != s.axis)
        per_feature = score.sum(axis=axes)
        per_feature = per_feature / max(per_feature.mean(), 1e-30)
        if s.layout.block > 1:
            per_feature = per_feature.reshape(-1, s.layout.block).sum(axis=1)
        offset = 0
        for space, n in s.layout.segments:
            total[cg.space_group[space]] += per_feature[offset:offset + n]
            offset += n
    return total
