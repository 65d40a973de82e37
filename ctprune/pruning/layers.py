"""Which Convs of a lifted model ClickTrain prunes, and why the others stay dense.

Prunable: 3x3 kernels, group 1, dilation 1 (what PatternConv runs). By default the first Conv of the network (the
first in the lift's topological order) stays dense: it sees the raw image through very few input channels, so it holds
few weights and much of the accuracy; 1x1 and other Convs are not pattern-pruned. Reasons go to the report.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


def prunable_convs(
    conv_layers: Iterable, parameters: Mapping[str, torch.nn.Parameter], keep_first_dense: bool = True
) -> tuple[dict[str, torch.nn.Parameter], dict[str, str], dict[str, int]]:
    """ConvLayers of the lift + tg.onnx_parameters() -> ({conv node: weight}, {conv node: why dense}, {conv node: MACs}).

    Duck-typed on ConvLayer's node_name, weight_name, kernel_shape, group, dilations and (optional) macs.
    """
    layers = list(conv_layers)
    users: dict[str, int] = {}
    for layer in layers:
        users[layer.weight_name] = users.get(layer.weight_name, 0) + 1
    weights, skipped, macs = {}, {}, {}
    for i, layer in enumerate(layers):
        name = layer.node_name
        reason = _why_dense(layer, parameters, users)
        if reason is None and i == 0 and keep_first_dense:
            reason = "first Conv of the network, kept dense for accuracy"
        if reason is not None:
            skipped[name] = reason
            continue
        weights[name] = parameters[layer.weight_name]
        if getattr(layer, "macs", None) is not None:
            macs[name] = int(layer.macs)
    return weights, skipped, macs


def _why_dense(layer, parameters, users) -> str | None:
    kernel = tuple(layer.kernel_shape)
    if kernel != (3, 3):
        return f"{'x'.join(map(str, kernel))} kernel (only 3x3 Convs are pattern-pruned)"
    if int(layer.group) != 1:
        return f"grouped Conv (group {layer.group})"
    if tuple(layer.dilations or (1, 1)) != (1, 1):
        return f"dilated Conv (dilations {list(layer.dilations)})"
    if layer.weight_name not in parameters:
        return "weight is not a trainable initializer"
    if users[layer.weight_name] > 1:
        return "weight shared with another Conv"
    return None
