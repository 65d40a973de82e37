"""PreCropping: crop whole channels to the layer-wise densities of pruning-at-initialization.

    plan = plan_crop(model, ratio=4, pai="synflow-macs")  # groups, densities, kept channels per group
    plan.ratio_achieved, plan.report_layers()
    smaller = apply_crop(model, plan, data=x)              # standard ONNX ops, smaller Conv/BN/Gemm constants;
                                                           # `data`: per-channel statistics restored on these inputs

Pieces, one job each: groups.py (channel groups on the ONNX graph), densities.py (PAI layer-wise densities),
branches.py (residual branches the densities call empty, dropped whole), solve.py (joint kept-channel counts, rounded
to a channel multiple), crop.py (the graph surgery), restore.py (the dense model's per-channel statistics put back).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx

from ctprune.errors import RatioError
from ctprune.pruning.precrop.branches import Branch, branches_to_drop, remove_branches
from ctprune.pruning.precrop.crop import crop_model
from ctprune.pruning.precrop.densities import PAI_METHODS, Densities, layer_densities
from ctprune.graph.constants import ConstantTable
from ctprune.pruning.precrop.groups import ChannelGraph, ChannelGroup, Layer, channel_graph
from ctprune.pruning.precrop.restore import match_statistics
from ctprune.pruning.precrop.solve import TOLERANCE, check_reachable, solve_keep_counts, weight_model

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
    channels: ChannelGraph = field(repr=False)  # of the model once `dropped` is gone
    notes: list[str] = field(default_factory=list)
    dropped: list[Branch] = field(default_factory=list)  # residual branches removed whole, before cropping
    dropped_layers: list[Layer] = field(default_factory=list, repr=False)  # their weight layers
    layer_order: list[str] = field(default_factory=list, repr=False)  # the given model's weight layers, in graph order

    def _conv_weights(self) -> tuple[int, int]:
        wm = weight_model(self.channels)
        counts = np.array([len(self.keep[k]) for k in wm.keys], dtype=np.float64)
        removed = sum(l.weight_count for l in self.dropped_layers if l.op == "Conv")
        return int(wm.weights(wm.sizes).sum()) + removed, int(round(wm.weights(counts).sum()))

    @property
    def conv_weights(self) -> dict[str, int]:
        before, after = self._conv_weights()
        return {"before": before, "after": after}

    @property
    def ratio_achieved(self) -> float:
        before, after = self._conv_weights()
        return before / after

    def weight_totals(self) -> dict:
        """{"before", "after"}: the Conv weights (the plan interface the report reads; see PruningPlan)."""
        return dict(self.conv_weights)

    def dense_layers(self) -> dict[str, str]:
        return {}  # cropping keeps every layer a dense op

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
        into = {label: b.add for b in self.dropped for label in b.nodes}
        for layer in self.dropped_layers:
            target = self.densities.get(layer.name)
            rows.append({
                "name": layer.name, "op": layer.op, "kernel": list(layer.kernel_shape),
                "in_channels": 0, "out_channels": 0, "in_channels_before": layer.in_layout.features,
                "out_channels_before": layer.out_layout.features, "weights_before": layer.weight_count,
                "weights_after": 0, "pattern_count": None, "density_target": target, "density_achieved": 0.0,
                "note": f"residual branch into {into.get(layer.name, '?')!r} dropped" + (
                    f" (density {target:.3f} asked)" if target is not None else ""),
            })
        if self.layer_order:  # dropped layers where they were in the graph, not at the end
            where = {name: i for i, name in enumerate(self.layer_order)}
            rows.sort(key=lambda r: where.get(r["name"], len(where)))
        return rows

    def to_dict(self) -> dict:
        """JSON-ready summary (the report's `precrop` section)."""
        return {
            "pai": self.pai, "ratio_target": self.ratio_target, "ratio_achieved": self.ratio_achieved,
            "channel_multiple": self.channel_multiple, "conv_weights": self.conv_weights,
            "groups": [{"key": g.key, "size": g.size, "kept": len(self.keep[g.key]), "frozen": g.frozen}
                       for g in self.channels.groups.values()],
            "dropped_branches": [{"add": b.add, "convs": list(b.convs)} for b in self.dropped],
            "layers": self.report_layers(), "notes": list(self.notes),
        }


def plan_crop(model: onnx.ModelProto, ratio: float, pai: str = "synflow-macs", data: np.ndarray | None = None,
              channel_multiple: int = 8, pretrained: bool = True, seed: int = 0,
              drop_branches: bool = True) -> CropPlan:
    """Solve which channels to keep so the Conv weights shrink `ratio`-fold, layer by layer as `pai` would prune.

    `data`: a few inputs (float32, the model's layout) for SNIP/GraSP; SynFlow/ERK/uniform need none.
    `pretrained`: keep the most important channels (PAI scores, else |w|); False keeps the first ones (they will be
    re-initialised anyway).
    `drop_branches`: with a score-based `pai` (synflow, snip, grasp), residual branches it keeps (nearly) nothing of
    go whole (branches.py); the rest is cropped to the remaining budget, with densities scored anew on what remains.
    Not with the -macs variant: its MACs bound would then have to come out of the early, MACs-heavy layers alone
    (measured: 0.8 points lower on the examples' ResNet-20 at 4x, examples/RESULTS_precrop.md).
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
    check_reachable(cg, ratio, channel_multiple)  # before any drop: a ratio that needs whole groups gone is an error
    dens = layer_densities(model, cg, ratio, pai, data, seed)
    if drop_branches and dens.scores is not None and not pai.endswith("-macs"):
        dropped = branches_to_drop(model, cg, dens.by_layer, ratio, channel_multiple)
        plan = _plan_dropping(model, cg, dens, dropped, ratio, data, channel_multiple, pretrained, seed, notes)
        if plan is not None:
            return plan
    counts = solve_keep_counts(cg, dens.by_layer, ratio, channel_multiple, macs_per_weight=dens.macs_per_weight)
    return _make_plan(model, cg, dens, counts, ratio, channel_multiple, pretrained, notes)


def _plan_dropping(model, cg, dens, dropped, ratio, data, multiple, pretrained, seed, notes) -> CropPlan | None:
    """The plan with the `dropped` branches removed first and the rest cropped to what is left of the budget, its
    densities scored anew on the smaller model; None when there is nothing to drop or when that plan would miss the
    ratio (what remains may have floors the full model could spread)."""
    if not dropped:
        return None
    before = _conv_total(cg)
    reduced = remove_branches(model, dropped)
    rcg = channel_graph(reduced)
    ratio_left = _conv_total(rcg) / (before / ratio)
    try:
        check_reachable(rcg, ratio_left, multiple)
    except RatioError:
        return None
    rdens = layer_densities(reduced, rcg, ratio_left, dens.method, data, seed)
    counts = solve_keep_counts(rcg, rdens.by_layer, ratio_left, multiple)
    gone = {label for b in dropped for label in b.nodes}
    dropped_layers = [l for l in cg.layers if l.name in gone]
    asked = {l.name: dens.by_layer[l.name] for l in dropped_layers if l.name in dens.by_layer}
    note = (f"{len(dropped)} residual branch(es) dropped whole ({dens.method} keeps almost nothing of them): "
            + ", ".join(b.add for b in dropped) + f"; the rest cropped {ratio_left:.2f}x")
    plan = _make_plan(reduced, rcg, rdens, counts, ratio, multiple, pretrained, notes + [note], dropped,
                      dropped_layers, asked, [l.name for l in cg.layers])
    if abs(plan.ratio_achieved / ratio - 1) > TOLERANCE:
        log.info("precrop: dropping %d residual branch(es) would miss the ratio; cropping them instead", len(dropped))
        return None
    log.info("precrop: %s", note)
    return plan


def _make_plan(model, cg, dens, counts, ratio, multiple, pretrained, notes, dropped=(), dropped_layers=(),
               asked=None, layer_order=()) -> CropPlan:
    """Which channels of each group stay: the most important ones for a pretrained model, else the first ones."""
    importance = _channel_importance(model, cg, dens) if pretrained else None
    keep = {}
    for key, group in cg.groups.items():
        k = counts[key]
        if importance is None or k == group.size:
            keep[key] = np.arange(k, dtype=np.int64)
        else:
            keep[key] = np.sort(np.argsort(-importance[key], kind="stable")[:k]).astype(np.int64)
    plan = CropPlan(float(ratio), dens.method, multiple, keep, {**(asked or {}), **dens.by_layer}, cg,
                    notes + dens.notes, list(dropped), list(dropped_layers), list(layer_order))
    log.info("precrop plan: %s densities, %.2fx conv-weight ratio (target %.2fx)", dens.method, plan.ratio_achieved,
             ratio)
    return plan


def apply_crop(model: onnx.ModelProto, plan: CropPlan, data: np.ndarray | None = None) -> onnx.ModelProto:
    """A new model with only the planned channels: smaller standard Conv/BN/Gemm constants, same graph inputs/outputs.

    `data`: inputs (float32, the model's layout; the first few hundred are used) on which every cropped Conv's kept
    output channels are given the mean and spread they have in `model` (restore.py). Without it a network whose
    BatchNormalization was folded into its Convs can lose its input-dependent signal to the crop.
    """
    dense = model = _with_constant_weights(model)
    if plan.dropped:
        model = remove_branches(model, plan.dropped)
    cg = channel_graph(model)
    cropped = crop_model(model, plan.keep, cg)
    if data is not None:
        cropped = match_statistics(dense, cropped, cg, plan.keep, data)
    return cropped


def _conv_total(cg: ChannelGraph) -> float:
    """The Conv weights of `cg`'s model."""
    wm = weight_model(cg)
    return float(wm.weights(wm.sizes).sum())


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
