"""Layer-wise densities from pruning-at-initialization (PAI) scores.

PreCropping's premise: what a PAI method gets right is how dense each layer should be, not which weights stay. So we
run the PAI method as if pruning weights to `1/ratio` of the Conv weights (one global threshold), and keep only the
per-layer fraction it would keep. Methods:

- ``synflow``: iterative synaptic flow (Tanaka et al. 2020); data-free. Abs weights, all-ones input, R = sum of
  outputs, score |w · dR/dw|, `iterations` rounds of exponentially shrinking density, masks re-applied each round.
- ``synflow-macs`` (default): SynFlow importance per multiply-add: scores divided by (MACs per weight)^alpha, alpha the smallest
  that makes the global keep shrink MACs as much as weights; the solver then holds that bound (solve.py). SynFlow
  alone keeps the early, high-resolution layers dense, so at 4x fewer weights MACs (and latency) drop far less.
- ``snip``: |w · dL/dw| on a batch (Lee et al. 2019).
- ``grasp``: -w · (H g), remove the largest (Wang et al. 2020); needs double backprop.
- ``erk``: Erdős–Rényi-kernel densities ∝ (c_in + c_out + kh + kw) / (c_in · c_out · kh · kw); shape only.
- ``uniform``: 1/ratio everywhere.

SNIP and GraSP need inputs: the given batch, else a small standard-normal batch (logged). Without labels they use the
model's own predictions as targets. Scores are returned too: channel selection uses them when the model is pretrained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from ctprune.errors import DataError, GraphError, RatioError
from ctprune.graph.constants import ConstantTable
from ctprune.pruning.precrop.groups import ChannelGraph

log = logging.getLogger(__name__)

PAI_METHODS = ("synflow", "synflow-macs", "snip", "grasp", "erk", "uniform")


@dataclass
class Densities:
    """Per Conv layer (node label) the density PAI would give; per Conv weight name its scores (None: shape-only)."""

    method: str
    by_layer: dict[str, float]
    scores: dict[str, np.ndarray] | None = None
    notes: list[str] = field(default_factory=list)
    macs_per_weight: dict[str, float] | None = None  # set: the solver must shrink MACs at least as much as weights


def layer_densities(model: onnx.ModelProto, cg: ChannelGraph, ratio: float, pai: str = "synflow",
                    data: np.ndarray | None = None, seed: int = 0, iterations: int = 20) -> Densities:
    if pai not in PAI_METHODS:
        raise RatioError(f"unknown PAI method {pai!r}; choose one of {', '.join(PAI_METHODS)}")
    convs = [l for l in cg.layers if l.op == "Conv"]
    counts = {l.name: l.weight_count for l in convs}
    if pai == "uniform":
        return Densities(pai, {name: 1.0 / ratio for name in counts})
    if pai == "erk":
        consts = ConstantTable(model.graph)
        return Densities(pai, _erk({l.name: consts.shape(l.weight) for l in convs}, ratio))
    weight_of = {l.name: l.weight for l in convs}
    base = pai.removesuffix("-macs")
    scores = _pai_scores(model, list(weight_of.values()), base, ratio, data, seed, iterations)
    notes, per_weight = [], None
    if pai != base:
        per_weight = macs_per_weight(model, cg)
        if per_weight is None:
            notes.append("MACs bound not applied: some Conv output shapes are unknown; plain SynFlow densities used")
            log.warning("precrop: %s", notes[-1])
    if per_weight is None:
        keep = _global_keep(scores, 1.0 / ratio, keep_largest=True)
    else:
        keep = _macs_balanced_keep(scores, {weight_of[n]: v for n, v in per_weight.items()}, ratio)
    by_layer = {name: float(keep[w].mean()) for name, w in weight_of.items()}
    return Densities(pai, by_layer, {w: s.numpy() for w, s in scores.items()}, notes, per_weight)


def macs_per_weight(model: onnx.ModelProto, cg: ChannelGraph) -> dict[str, float] | None:
    """Conv node → multiply-adds per weight (its output's spatial size), from shape inference; None when some Conv's
    output shape is unknown."""
    from ctprune.graph.layers import conv_layers

    spatial = {}
    for c in conv_layers(model):
        if c.macs is not None:
            spatial[c.weight_name] = c.macs / (c.out_channels * (c.in_channels // c.group) * np.prod(c.kernel_shape))
    convs = [l for l in cg.layers if l.op == "Conv"]
    if any(l.weight not in spatial for l in convs):
        return None
    return {l.name: float(spatial[l.weight]) for l in convs}


def _macs_balanced_keep(scores: dict[str, torch.Tensor], spatial: dict[str, float], ratio: float,
                        steps: int = 30) -> dict[str, torch.Tensor]:
    """Global keep of score / spatial^alpha, alpha found by bisection: the smallest that keeps at most 1/ratio of the
    MACs (MACs of a weight = its layer's spatial size), i.e. the least departure from the PAI ranking."""
    size = {w: s.numel() for w, s in scores.items()}
    full_macs = sum(size[w] * spatial[w] for w in scores)

    def keep_at(alpha):
        adjusted = {w: s.double() / spatial[w] ** alpha for w, s in scores.items()}
        keep = _global_keep(adjusted, 1.0 / ratio, keep_largest=True)
        macs = sum(float(k.sum()) * spatial[w] for w, k in keep.items())
        return keep, macs / full_macs

    keep, fraction = keep_at(0.0)
    if fraction <= 1.0 / ratio:
        return keep
    lo, hi = 0.0, 1.0
    keep_hi, fraction = keep_at(hi)
    while fraction > 1.0 / ratio and hi < 16:
        lo, hi = hi, 2 * hi
        keep_hi, fraction = keep_at(hi)
    for _ in range(steps):  # keep_hi: the keep at hi, the smallest alpha known to meet the bound (or alpha = 16)
        mid = 0.5 * (lo + hi)
        keep_mid, fraction = keep_at(mid)
        if fraction > 1.0 / ratio:
            lo = mid
        else:
            hi, keep_hi = mid, keep_mid
    return keep_hi


def _erk(shapes: dict[str, tuple], ratio: float) -> dict[str, float]:
    """ERK: density_l = eps · raw_l, eps set so the total matches; layers that would exceed 1 are pinned to 1."""
    raw = {n: sum(s[:2]) / np.prod(s[:2]) + (sum(s[2:]) / np.prod(s) if len(s) > 2 else 0.0) for n, s in shapes.items()}
    size = {n: float(np.prod(s)) for n, s in shapes.items()}
    budget = sum(size.values()) / ratio
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        eps = (budget - sum(size[n] for n in dense)) / sum(raw[n] * size[n] for n in free)
        over = [n for n in free if eps * raw[n] > 1]
        if not over:
            return {n: 1.0 if n in dense else float(eps * raw[n]) for n in shapes}
        dense.update(over)


def _global_keep(scores: dict[str, torch.Tensor], density: float, keep_largest: bool) -> dict[str, torch.Tensor]:
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    k = max(1, int(round(density * flat.numel())))
    values = flat if keep_largest else -flat
    threshold = torch.topk(values, k, sorted=True).values[-1]
    return {n: ((s if keep_largest else -s) >= threshold).to(s.dtype) for n, s in scores.items()}


def _lift(model):
    from ctprune.graph import lift  # torch interpreter of the ONNX graph (lazy: heavy import)

    return lift(model)


def _inputs(tg, data, seed) -> torch.Tensor:
    if len(tg.input_names) != 1:
        raise DataError(f"PAI scoring needs a model with one input; this one has {tg.input_names}")
    if data is not None:
        return torch.as_tensor(np.asarray(data[:32], dtype=np.float32))
    shape = tg.input_shapes[0]
    if not shape or any(d in (None, 0) for d in shape[1:]):
        raise DataError(f"input {tg.input_names[0]!r} has no static shape {shape}; pass data for the PAI scores")
    log.info("no data for PAI scores: using 8 standard-normal inputs of shape %s", tuple(shape[1:]))
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((8, *shape[1:]), generator=gen)


def _pai_scores(model, weights, pai, ratio, data, seed, iterations) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    if pai == "synflow":
        return _synflow(model, weights, ratio, iterations)
    tg = _lift(model)
    tg.eval()
    params = tg.onnx_parameters()
    missing = [w for w in weights if w not in params]
    if missing:
        raise GraphError(f"Conv weights {missing[:5]} are not trainable parameters of the lifted graph")
    x = _inputs(tg, data, seed)
    ws = [params[w] for w in weights]
    out = tg(x)
    out = (out[0] if isinstance(out, tuple) else out).reshape(len(x), -1)
    target = out.argmax(1).detach()
    loss = F.cross_entropy(out, target)
    if pai == "snip":
        grads = torch.autograd.grad(loss, ws)
        return {w: (g * p).abs().detach().float() for w, g, p in zip(weights, grads, ws)}
    # GraSP: Hg by double backprop; score = -w·Hg, and the weights with the largest scores go.
    grads = torch.autograd.grad(loss, ws, create_graph=True)
    flat_g = [g.detach() for g in grads]
    z = sum((g * fg).sum() for g, fg in zip(grads, flat_g))
    hg = torch.autograd.grad(z, ws)
    # Removing the largest -w·Hg is keeping the largest w·Hg.
    return {w: (p * h).detach().float() for w, p, h in zip(weights, ws, hg)}


def _linearize(model: onnx.ModelProto) -> onnx.ModelProto:
    """SynFlow's network: Clip(0, 6) would saturate on all-ones inputs and stop the flow, so it becomes Relu."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.op_type == "Clip":
            node.op_type = "Relu"
            del node.input[1:]
            del node.attribute[:]
    return out


@torch.no_grad()
def _make_positive(tg, model: onnx.ModelProto) -> None:
    """SynFlow's linearised network: abs of every parameter and BN variance, BN means zeroed (x - mean could turn
    the all-positive flow negative and let Relu cut it)."""
    for p in tg.parameters():
        p.abs_()
    means = {n.input[3] for n in model.graph.node if n.op_type == "BatchNormalization" and len(n.input) > 3}
    for name, b in tg.onnx_buffers().items():
        if name in means:
            b.zero_()
        else:
            b.abs_()


def _synflow(model, weights, ratio, iterations) -> dict[str, torch.Tensor]:
    tg = _lift(_linearize(model))
    tg.eval()
    _make_positive(tg, model)
    params = tg.onnx_parameters()
    missing = [w for w in weights if w not in params]
    if missing:
        raise GraphError(f"Conv weights {missing[:5]} are not trainable parameters of the lifted graph")
    # Unit mean fan-in sum per weight keeps R finite on deep graphs; the ranking is invariant to per-layer scale.
    with torch.no_grad():
        for w in weights:
            p = params[w]
            fan = p.sum(dim=tuple(range(1, p.dim()))).mean().clamp_min(1e-12)
            p.div_(fan)
    originals = {w: params[w].detach().clone() for w in weights}
    masks = {w: torch.ones_like(p) for w, p in originals.items()}
    shape = tg.input_shapes[0]
    if not shape or any(d in (None, 0) for d in shape[1:]):
        raise DataError(f"input {tg.input_names[0]!r} has no static shape {shape}; SynFlow needs one")
    ones = torch.ones((1, *shape[1:]))
    scores = {}
    for it in range(1, iterations + 1):
        with torch.no_grad():
            for w in weights:
                params[w].copy_(originals[w] * masks[w])
        tg.zero_grad()
        out = tg(ones)
        total = sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum()
        if not torch.isfinite(total):
            raise GraphError("SynFlow's synaptic flow overflowed on this graph; use --pai erk or snip")
        total.backward()
        scores = {w: (params[w].grad * params[w]).abs().detach() for w in weights}
        kept = _global_keep(scores, (1.0 / ratio) ** (it / iterations), keep_largest=True)
        masks = {w: kept[w] * masks[w] for w in weights}  # pruned stays pruned, even on score ties at zero
    return {w: s.float() for w, s in scores.items()}
