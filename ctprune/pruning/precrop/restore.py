"""Restore the dense model's per-channel output statistics after a crop (data-driven, one forward pass).

A Conv whose BatchNormalization was folded in at export computes, per output channel, a sum over all its input
channels plus a bias set for that sum. Cropping input channels away removes part of the sum: on the examples'
MobileNetV2 at 8x a 1x1 layer keeps 8 of 96 or 576 inputs, and the spread of its output across images falls by about
sqrt(kept / total) while the bias stays. Layer after layer the input-dependent part shrinks geometrically (across a
batch of images 0.8 at the stem, 0.03 in the middle stages, 3e-4 at the logits) and the output becomes a constant:
one class for every image, and no gradient that fine-tuning could follow. Most activations are not below ReLU6's
floor (40-60% zeros, as in the dense model); what is lost is the scale, not the sign.

The fix renormalises each cropped Conv's kept output channels to the dense Conv's statistics on the same images:
y' = a * y + c with a = std_dense / std_cropped and c = mean_dense - a * mean_cropped, folded into the Conv's weight
and bias (a bias is added when it has none), i.e. BatchNorm statistics re-estimated on the cropped network. The layers
are corrected in graph order within one forward pass, each on inputs its corrected predecessors produced.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import torch
from torch import nn

from ctprune.graph.constants import ConstantTable
from ctprune.graph.edit import drop_unread, taken_names, unique_name
from ctprune.graph.readers import TensorReaders
from ctprune.pruning.precrop.crop import _sync_graph_inputs
from ctprune.pruning.precrop.groups import ChannelGraph, node_label

log = logging.getLogger(__name__)

__all__ = ["match_statistics", "MAX_CALIBRATION_BYTES", "MAX_CALIBRATION_SAMPLES"]

MAX_CALIBRATION_SAMPLES = 256
MAX_CALIBRATION_BYTES = 16_000_000  # of input: activations are ~10x that; 26 images at 224x224x3
# A cropped channel whose spread is below this fraction of the dense one's is left unscaled (only shifted): its
# input-dependent part is gone (or was never there), and scaling it up would amplify rounding noise.
MIN_RELATIVE_STD = 1e-4


def calibration_batch(x: np.ndarray) -> np.ndarray:
    """The first images of `x` that the correction uses: at most MAX_CALIBRATION_SAMPLES, MAX_CALIBRATION_BYTES."""
    per_sample = max(x[:1].nbytes, 1)
    n = max(1, min(len(x), MAX_CALIBRATION_SAMPLES, MAX_CALIBRATION_BYTES // per_sample))
    return np.ascontiguousarray(x[:n], dtype=np.float32)


class _Record(nn.Module):
    """Identity that keeps its input's per-channel mean and standard deviation (over batch and positions)."""

    def __init__(self):
        super().__init__()
        self.mean = self.std = None

    def forward(self, y):
        self.mean, self.std = _channel_stats(y)
        return y


class _Match(nn.Module):
    """Maps its input's per-channel statistics to `target` (mean, std) and keeps the affine map it used."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, scale: bool):
        super().__init__()
        self.target_mean, self.target_std, self.scale = mean, std, scale
        self.a = self.c = None

    def forward(self, y):
        mean, std = _channel_stats(y)
        a = torch.ones_like(mean)
        if self.scale:
            usable = std > MIN_RELATIVE_STD * self.target_std + 1e-12
            a = torch.where(usable, self.target_std / std.clamp_min(1e-30), a)
        c = self.target_mean - a * mean
        self.a, self.c = a, c
        shape = (1, -1) + (1,) * (y.dim() - 2)
        return y * a.reshape(shape).to(y.dtype) + c.reshape(shape).to(y.dtype)


def _channel_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [d for d in range(y.dim()) if d != 1]
    flat = y.detach().double()
    mean = flat.mean(dims)
    std = (flat * flat).mean(dims).sub(mean * mean).clamp_min(0).sqrt()
    return mean, std


def _labelled(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose nodes all carry their precrop label as name (lifted modules are addressed by node name)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        node.name = node_label(node)
    return out


def match_statistics(dense: onnx.ModelProto, cropped: onnx.ModelProto, cg: ChannelGraph,
                     keep: dict[str, np.ndarray], x: np.ndarray, scale: bool = True) -> onnx.ModelProto:
    """A copy of `cropped` whose Convs' kept output channels have, on the images `x`, the per-channel mean and
    standard deviation the same channels have in `dense`. `cg`, `keep`: the crop's channel graph (of the model that
    was cropped) and kept channels. `scale=False` restores only the means (bias correction)."""
    from ctprune.graph import lift

    x = calibration_batch(x)
    convs = {l.name: l for l in cg.layers if l.op == "Conv"}
    dense_nodes = {node_label(n) for n in dense.graph.node if n.op_type == "Conv"}
    cropped_nodes = {node_label(n): n for n in cropped.graph.node if n.op_type == "Conv"}
    names = [name for name in convs if name in dense_nodes and name in cropped_nodes]
    if not names:
        return cropped

    reference = lift(_labelled(dense)).eval()
    records = {name: _Record() for name in names}
    for name, rec in records.items():
        reference.attach_output_module(name, rec)
    with torch.no_grad():
        reference(torch.from_numpy(x))
    del reference

    student = lift(_labelled(cropped)).eval()
    matches = {}
    for name in names:
        kept = torch.from_numpy(cg.kept_features(convs[name].out_layout, keep))
        rec = records[name]
        matches[name] = _Match(rec.mean[kept], rec.std[kept], scale)
        student.attach_output_module(name, matches[name])
    with torch.no_grad():
        student(torch.from_numpy(x))
    del student

    out = onnx.ModelProto()
    out.CopyFrom(cropped)
    nodes = {node_label(n): n for n in out.graph.node}
    consts = ConstantTable(out.graph)
    readers = TensorReaders(out.graph)
    taken = taken_names(out.graph)
    changed, replaced = 0, []
    for name, m in matches.items():
        a, c = m.a.numpy(), m.c.numpy()
        if np.allclose(a, 1, rtol=0, atol=1e-5) and np.allclose(c, 0, rtol=0, atol=1e-6):
            continue  # nothing upstream of this layer changed
        replaced += _fold(out.graph, nodes[name], a, c, consts, readers, taken)
        changed += 1
    drop_unread(out.graph, replaced)
    _sync_graph_inputs(out)
    log.info("precrop: output statistics of %d cropped Conv(s) matched to the dense model's on %d image(s)",
             changed, len(x))
    return out


def _fold(graph, node, a: np.ndarray, c: np.ndarray, consts: ConstantTable, readers: TensorReaders,
          taken) -> list[str]:
    """Conv `node` computes a * (its output) + c: weight rows times a, bias a * b + c (b = 0 when it has none).
    Returns the constants it stopped reading."""
    w = consts.get(node.input[1])
    b = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(w.shape[0], w.dtype)
    new_w = (w * a.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype)
    new_b = (b * a + c).astype(b.dtype)
    while len(node.input) < 3:
        node.input.append("")
    return [name for name in (_write(graph, node, 1, new_w, consts, readers, taken),
                              _write(graph, node, 2, new_b, consts, readers, taken)) if name]


def _write(graph, node, slot: int, value: np.ndarray, consts: ConstantTable, readers: TensorReaders,
           taken) -> str | None:
    """Give input `slot` of `node` the constant `value`: in place when this node is its only reader, else a new
    initializer (shared or aliased constants stay as they are for their other readers). Returns the name the node
    stopped reading, if any."""
    name = node.input[slot]
    if name and name in consts.initializers and readers.only_reader(name) is not None:
        consts.set(name, value)
        return None
    new = unique_name(f"{name or node.output[0] + '_bias'}__matched", taken)
    graph.initializer.append(onnx.numpy_helper.from_array(np.ascontiguousarray(value), new))
    node.input[slot] = new
    return name or None
