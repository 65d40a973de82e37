"""Joint keep-ratio solver: one kept-channel count per group so every Conv's weights approach its density.

A Conv's weight count is kernel · c_in · c_out, with c_in from one group (or several, after a Concat) and c_out from
another, so neighbouring layers share a variable: r_in · r_out ≈ d_l couples them; r = sqrt(d) is only right when all
densities are equal. We minimise

    J(k) = mean_l (log w_l(k) - log t_l)^2  +  mu · (log Σ_l w_l(k) - log B)^2

over kept counts k_g (t_l = d_l · W_l the layer's target, B = W / ratio the budget): first continuously (Adam on
log-keep-ratios, box-constrained), then over the allowed counts (multiples of `channel_multiple`, or the whole group) by
greedy ±1-step moves from the rounded solution, so the rounding is part of the optimisation, not an afterthought.

With `macs_per_weight` (a Conv's multiply-adds per weight: its output's spatial size) a MACs bound is added: the kept
fraction of MACs may not exceed the kept fraction of weights, i.e. MACs shrink at least as much as weights. Latency
follows MACs, and PAI densities alone keep the early, high-resolution layers dense (few weights, many MACs each).
The bound is a one-sided penalty  MACS_WEIGHT · max(0, log(M(k)/M) - log(w(k)/W))^2.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ctprune.errors import RatioError
from ctprune.pruning.precrop.groups import ChannelGraph, Layer

log = logging.getLogger(__name__)

BUDGET_WEIGHT = 1000.0  # mu: a 5% budget miss (0.05^2 · mu = 2.5) outweighs any per-layer fit gain
MACS_WEIGHT = 1e5  # the MACs bound is meant to hold: a 1% excess (1e-4 · 1e5 = 10) outweighs any fit gain
TOLERANCE = 0.05


@dataclass
class WeightModel:
    """w_l(k) = coef_l · (A_in k + c_in)_l · (A_out k)_l for the conv layers, k = kept channels per group."""

    keys: list[str]
    sizes: np.ndarray
    a_in: np.ndarray
    c_in: np.ndarray
    a_out: np.ndarray
    coef: np.ndarray
    layers: list[Layer]

    def weights(self, k: np.ndarray) -> np.ndarray:
        return self.coef * (self.a_in @ k + self.c_in) * (self.a_out @ k)

    def torch_weights(self):
        """w(k) as a torch function (for the continuous solve)."""
        a_in, c_in, a_out, coef = (torch.as_tensor(getattr(self, n), dtype=torch.float64)
                                   for n in ("a_in", "c_in", "a_out", "coef"))
        return lambda k: coef * (a_in @ k + c_in) * (a_out @ k)


def weight_model(cg: ChannelGraph) -> WeightModel:
    keys = list(cg.groups)
    index = {k: i for i, k in enumerate(keys)}
    convs = [l for l in cg.layers if l.op == "Conv"]
    a_in = np.zeros((len(convs), len(keys)))
    a_out = np.zeros((len(convs), len(keys)))
    c_in = np.zeros(len(convs))
    coef = np.zeros(len(convs))
    for i, layer in enumerate(convs):
        for space, _ in layer.out_layout.segments:
            a_out[i, index[cg.space_group[space]]] += layer.out_layout.block
        if layer.depthwise:
            c_in[i] = 1.0
        else:
            for space, _ in layer.in_layout.segments:
                a_in[i, index[cg.space_group[space]]] += layer.in_layout.block
        coef[i] = layer.kernel / (1 if layer.depthwise else layer.group)
    sizes = np.array([cg.groups[k].size for k in keys], dtype=np.float64)
    return WeightModel(keys, sizes, a_in, c_in, a_out, coef, convs)


def allowed_counts(size: int, multiple: int, frozen: bool) -> np.ndarray:
    """Kept-channel counts a group may take: multiples of `multiple` up to its size, and the size itself."""
    if frozen or size <= multiple:
        return np.array([size])
    return np.array(sorted(set(range(multiple, size + 1, multiple)) | {size}))


def solve_keep_counts(cg: ChannelGraph, densities: dict[str, float], ratio: float, multiple: int = 8,
                      steps: int = 400, macs_per_weight: dict[str, float] | None = None) -> dict[str, int]:
    """Kept channels per group key so Conv weights ≈ densities and their total ≈ total / ratio.

    `macs_per_weight` (Conv node → MACs per weight): also keep the MACs fraction at or below the weights fraction."""
    if ratio <= 1:
        raise RatioError(f"the compression ratio must be a number > 1, got {ratio}")
    check_reachable(cg, ratio, multiple)
    wm = weight_model(cg)
    full = wm.weights(wm.sizes)
    total = full.sum()
    budget = total / ratio
    options = [allowed_counts(cg.groups[k].size, multiple, bool(cg.groups[k].frozen)) for k in wm.keys]
    lowest = np.array([o[0] for o in options], dtype=np.float64)

    dens = np.array([min(1.0, max(densities.get(l.name, 1.0 / ratio), 1e-6)) for l in wm.layers])
    log_target = np.log(dens * full)
    spatial = None
    if macs_per_weight is not None:
        # MACs per weight relative to the dense model's mean, so the bound's excess is log(mean of the kept weights')
        # relative MACs): the full model's totals are folded in once, not in every objective evaluation.
        spatial = np.array([macs_per_weight[l.name] for l in wm.layers], dtype=np.float64)
        spatial = spatial / ((full * spatial).sum() / total)
    x = _continuous(wm, log_target, np.log(budget), np.log(lowest / wm.sizes), steps, spatial)
    choice = [int(np.argmin(np.abs(np.log(o) - np.log(wm.sizes[g] * np.exp(x[g]))))) for g, o in enumerate(options)]
    choice = _greedy(wm, options, choice, log_target, np.log(budget), spatial)
    counts = np.array([options[g][c] for g, c in enumerate(choice)], dtype=np.float64)
    achieved = total / wm.weights(counts).sum()
    log.info("precrop solver: ratio target %.3gx, achieved %.3gx (channel multiple %d)", ratio, achieved, multiple)
    if spatial is not None:
        log.info("precrop solver: MACs ratio %.3gx", (full * spatial).sum() / (wm.weights(counts) * spatial).sum())
    return {k: int(c) for k, c in zip(wm.keys, counts)}


def check_reachable(cg: ChannelGraph, ratio: float, multiple: int = 8) -> None:
    """Raise RatioError when `ratio` could only be met by removing whole channel groups."""
    wm = weight_model(cg)
    if not wm.layers:
        raise RatioError("the model has no Conv layers whose channels could be cropped")
    lowest = np.array([allowed_counts(cg.groups[k].size, multiple, bool(cg.groups[k].frozen))[0] for k in wm.keys],
                      dtype=np.float64)
    reachable = wm.weights(wm.sizes).sum() / wm.weights(lowest).sum()
    if ratio <= reachable * (1 + TOLERANCE):
        return
    # The groups already at their floor that carry most weight are the ones the ratio would have to remove.
    carried = np.array([(wm.weights(lowest) * ((wm.a_in[:, g] + wm.a_out[:, g]) > 0)).sum() for g in range(len(wm.keys))])
    names = [cg.groups[wm.keys[g]].describe() for g in np.argsort(-carried)[:3] if not cg.groups[wm.keys[g]].frozen]
    frozen = sum(1 for g in cg.groups.values() if g.frozen)
    raise RatioError(
        f"a ratio of {ratio:g}x cannot be reached by cropping channels: with at least {multiple} channel(s) kept per "
        f"group the largest reachable ratio is {reachable:.2f}x; more would remove whole channel groups such as "
        f"{'; '.join(names) or 'none (every group is frozen)'}. {frozen} group(s) must stay whole (graph inputs/outputs, "
        f"grouped convs, untraced ops). Use a smaller --ratio or a smaller --channel-multiple."
    )


def _objective_np(wm: WeightModel, counts: np.ndarray, log_target, log_budget, spatial=None) -> float:
    w = wm.weights(counts)
    fit = np.mean((np.log(w) - log_target) ** 2)
    score = fit + BUDGET_WEIGHT * (np.log(w.sum()) - log_budget) ** 2
    if spatial is not None:  # kept MACs fraction over kept weights fraction, in logs (spatial: relative MACs)
        excess = np.log((w * spatial).sum() / w.sum())
        score += MACS_WEIGHT * max(0.0, excess) ** 2
    return float(score)


def _continuous(wm: WeightModel, log_target, log_budget, lo, steps, spatial=None) -> np.ndarray:
    """Box-constrained Adam on x = log(k / size) ∈ [lo, 0]; returns x."""
    lo_t = torch.as_tensor(lo, dtype=torch.float64)
    sizes = torch.as_tensor(wm.sizes, dtype=torch.float64)
    tgt = torch.as_tensor(log_target, dtype=torch.float64)
    x = torch.maximum(torch.full_like(lo_t, 0.5 * (log_budget - np.log(wm.weights(wm.sizes).sum()))), lo_t)
    x = x.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    weights = wm.torch_weights()
    sp = None if spatial is None else torch.as_tensor(spatial, dtype=torch.float64)
    for step in range(steps):
        ease = min(1.0, (step + 1) / (steps / 2))  # ease the budgets in: fit the shape first
        w = weights(sizes * torch.exp(x))
        loss = torch.mean((torch.log(w) - tgt) ** 2) + ease * BUDGET_WEIGHT * (torch.log(w.sum()) - log_budget) ** 2
        if sp is not None:
            excess = torch.log((w * sp).sum() / w.sum())
            loss = loss + ease * MACS_WEIGHT * torch.clamp(excess, min=0) ** 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.copy_(torch.clamp(x, min=lo_t, max=torch.zeros_like(lo_t)))
    return x.detach().numpy()


def _greedy(wm: WeightModel, options, choice, log_target, log_budget, spatial=None,
            max_moves: int = 10000) -> list[int]:
    """Best single ±1-step move per round until none lowers the discrete objective."""
    choice = list(choice)
    counts = np.array([options[g][c] for g, c in enumerate(choice)], dtype=np.float64)
    best = _objective_np(wm, counts, log_target, log_budget, spatial)
    movable = [g for g, o in enumerate(options) if len(o) > 1]
    for _ in range(max_moves):
        move, move_score = None, best
        for g in movable:
            for d in (-1, 1):
                c = choice[g] + d
                if 0 <= c < len(options[g]):
                    old = counts[g]
                    counts[g] = options[g][c]
                    score = _objective_np(wm, counts, log_target, log_budget, spatial)
                    counts[g] = old
                    if score < move_score - 1e-12:
                        move, move_score = (g, c), score
        if move is None:
            break
        choice[move[0]] = move[1]
        counts[move[0]] = options[move[0]][move[1]]
        best = move_score
    return choice
