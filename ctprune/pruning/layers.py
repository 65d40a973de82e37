"""Which layers of a model ctprune prunes, in which form, and why the others stay dense: the one place that decides.

Forms (contract.md):
- "pattern": 3x3 Conv, group 1, dilation 1 -> ClickTrain patterns + connectivity -> PatternConv;
- "sparse": every other 2-D Conv with more than one input channel per group (1x1, kxk, dilated, grouped but not
  depthwise), and every Gemm/MatMul with a stored 2-D weight -> fine-grained pruning in blocks of output channels
  that share one sparsity pattern -> SparseConv. With method "pattern" these stay dense.
Dense, with the reason: depthwise Convs (one input channel per group: few weights; PreCropping shrinks them), the
network's first Conv (by default: it sees the raw image through few channels), the FC layer whose result is a graph
output (the classifier, unless `prune_head`), weights shared between layers or not stored as trainable tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

# Blocks of output channels that share one sparsity pattern: one loaded input vector feeds the whole block (the
# SparseConv kernel's register tile; BENCHMARKS.md). FC layers at batch 1 stream 8 weights per index.
CONV_BLOCK = 4
FC_BLOCK = 8
# At batch 1 a stored FC weight is read from memory once per multiply-add: about as costly as this many Conv
# multiply-adds (a Conv weight is reused across pixels from cache). Used to weigh FC layers in the allocation.
FC_COST_PER_WEIGHT = 16.0


@dataclass(frozen=True)
class SparseTarget:
    """How one layer is pruned in the sparse form: `block` output channels share a pattern; `transposed`: the stored
    weight is (I, O) (MatMul, Gemm with transB=0) rather than (O, I, ...)."""

    block: int
    transposed: bool = False
    kind: str = "conv"  # "conv" or "fc"


@dataclass
class PrunableLayers:
    """The decision for a whole model. `weights` holds every pruned layer's Parameter (pattern and sparse alike);
    `sparse` names the sparse ones; `cost` is each layer's multiply-adds per weight (FC: FC_COST_PER_WEIGHT)."""

    weights: dict[str, torch.nn.Parameter] = field(default_factory=dict)
    sparse: dict[str, SparseTarget] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    macs: dict[str, int] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)
    # break-even density: sparse layers' (sparse_cost.py), pattern layers' single-filter one (pattern_cost.py; a layer
    # pruned in blocks of filters runs the faster block path, and selection drops the cap there)
    max_density: dict[str, float] = field(default_factory=dict)

    @property
    def pattern_names(self) -> list[str]:
        return [n for n in self.weights if n not in self.sparse]

    def form(self, name: str) -> str:
        if name in self.sparse:
            return "sparse"
        return "pattern" if name in self.weights else "dense"


def decide_layers(conv_layers: Iterable, fc_layers: Iterable, parameters: Mapping[str, torch.nn.Parameter], *,
                  method: str = "auto", keep_first_dense: bool = True, prune_head: bool = False) -> PrunableLayers:
    """ConvLayers and FCLayers of a model + the lift's onnx_parameters() -> PrunableLayers. method "pattern": 3x3 only."""
    convs, fcs = list(conv_layers), list(fc_layers)
    users: dict[str, int] = {}
    for layer in convs + fcs:
        users[layer.weight_name] = users.get(layer.weight_name, 0) + 1
    out = PrunableLayers()
    for i, layer in enumerate(convs):
        name = layer.node_name
        form, reason = _conv_form(layer, parameters, users, method)
        if reason is None and i == 0 and keep_first_dense:
            form, reason = None, "first Conv of the network, kept dense for accuracy"
        if reason is not None:
            out.skipped[name] = reason
            continue
        out.weights[name] = parameters[layer.weight_name]
        if form == "sparse":
            # blocks never straddle two groups: a grouped Conv whose groups do not split into whole blocks uses 1
            per_group = layer.out_channels // max(int(layer.group), 1)
            block = CONV_BLOCK if int(layer.group) == 1 or per_group % CONV_BLOCK == 0 else 1
            out.sparse[name] = SparseTarget(block, transposed=False, kind="conv")
            out.max_density[name] = _break_even("conv", parameters[layer.weight_name].shape, layer, block)
        else:
            out.max_density[name] = _pattern_break_even(layer)
        if getattr(layer, "macs", None) is not None:
            out.macs[name] = int(layer.macs)
            # a weight costs at least its read from memory: a Conv on a 1x1 image (squeeze-excite) is an FC layer
            per_weight = layer.macs / max(1, math.prod(parameters[layer.weight_name].shape))
            out.cost[name] = max(per_weight, FC_COST_PER_WEIGHT)
    for layer in fcs:
        reason = _fc_reason(layer, parameters, users, method, prune_head)
        if reason is not None:
            out.skipped[layer.node_name] = reason
            continue
        out.weights[layer.node_name] = parameters[layer.weight_name]
        out.sparse[layer.node_name] = SparseTarget(FC_BLOCK, transposed=layer.transposed, kind="fc")
        out.max_density[layer.node_name] = _break_even("fc", (layer.out_features, layer.in_features), None, FC_BLOCK)
        out.macs[layer.node_name] = int(layer.macs)
        out.cost[layer.node_name] = FC_COST_PER_WEIGHT
    return out


def _pattern_break_even(layer) -> float:
    from ctprune.rewrite.pattern_cost import break_even_density, plane_pixels

    return break_even_density(blocked=False, pixels=plane_pixels(getattr(layer, "output_shape", None)))


def _break_even(kind: str, weight_shape, layer, block: int) -> float:
    """The density below which SparseConv beats the dense op on this layer (0: never), from rewrite/sparse_cost.py."""
    from ctprune.rewrite.sparse_cost import break_even_density

    input_hw = tuple(layer.input_shape[1:]) if layer is not None and getattr(layer, "input_shape", None) else None
    if layer is not None and (input_hw is None or None in input_hw):
        return 0.0
    stride = layer.strides[0] if layer is not None and getattr(layer, "strides", None) else 1
    return float(break_even_density(kind, tuple(weight_shape), input_hw, stride, block))


def prunable_convs(
    conv_layers: Iterable, parameters: Mapping[str, torch.nn.Parameter], keep_first_dense: bool = True
) -> tuple[dict[str, torch.nn.Parameter], dict[str, str], dict[str, int]]:
    """3x3-only view (method "pattern"): ({conv node: weight}, {conv node: why dense}, {conv node: MACs})."""
    layers = decide_layers(conv_layers, (), parameters, method="pattern", keep_first_dense=keep_first_dense)
    return layers.weights, layers.skipped, layers.macs


def _conv_form(layer, parameters, users, method) -> tuple[str | None, str | None]:
    """("pattern" | "sparse", None) or (None, why it stays dense)."""
    kernel = tuple(layer.kernel_shape)
    group = int(layer.group)
    dilations = tuple(layer.dilations or (1,) * len(kernel))
    if layer.weight_name not in parameters:
        return None, "weight is not a trainable initializer"
    if users[layer.weight_name] > 1:
        return None, "weight shared with another layer"
    if kernel == (3, 3) and group == 1 and dilations == (1, 1):
        return "pattern", None
    size = "x".join(map(str, kernel))
    if method == "pattern":
        if group != 1:
            return None, f"grouped Conv (group {group}); only 3x3 group-1 Convs are pattern-pruned"
        if dilations != (1,) * len(kernel):
            return None, f"dilated Conv (dilations {list(dilations)}); only undilated 3x3 Convs are pattern-pruned"
        return None, f"{size} kernel (only 3x3 Convs are pattern-pruned; --method auto prunes it sparse)"
    if layer.in_channels // max(group, 1) == 1:
        return None, "depthwise Conv (one input channel per group; --method precrop or both shrinks it)"
    if len(kernel) != 2:
        return None, f"{len(kernel)}-D Conv (SparseConv is 2-D)"
    return "sparse", None


def _fc_reason(layer, parameters, users, method, prune_head) -> str | None:
    if method == "pattern":
        return f"{layer.op_type} (FC) layer (only 3x3 Convs are pattern-pruned; --method auto prunes it sparse)"
    if layer.why_not:
        return f"{layer.op_type}: {layer.why_not}"
    if layer.weight_name not in parameters:
        return "weight is not a trainable initializer"
    if users[layer.weight_name] > 1:
        return "weight shared with another layer"
    if layer.is_head and not prune_head:
        return "classifier head (its output is the model's output; --prune-head prunes it)"
    return None


def mask_view(weight: torch.Tensor, target: SparseTarget | None) -> torch.Tensor:
    """The weight seen as (O, C, T): output channel, input channel (per group) and tap; FC weights as (O, I, 1)."""
    if weight.dim() == 2:
        w = weight.t() if target is not None and target.transposed else weight
        return w.reshape(w.shape[0], w.shape[1], 1)
    return weight.reshape(weight.shape[0], weight.shape[1], math.prod(weight.shape[2:]))


def from_mask_view(view: torch.Tensor, weight_shape: tuple, target: SparseTarget | None) -> torch.Tensor:
    """Inverse of mask_view for a tensor of the (O, C, T) view's shape."""
    if len(weight_shape) == 2:
        w = view.reshape(view.shape[0], view.shape[1])
        return w.t() if target is not None and target.transposed else w
    return view.reshape(weight_shape)
