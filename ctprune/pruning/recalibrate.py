"""Batch-statistics recalibration for Convs whose BatchNormalization was folded away at export.

Pruning 7 of 8 weights of a filter changes the scale and mean of its output; a network that still has BN re-learns
them through BN's statistics, but most exported graphs fold BN into the Conv's weight and bias, leaving nothing to
absorb the shift. For the fine-tune, a BatchNorm is put back after each pruned Conv that has a bias and no BN after it,
initialised to the dense Conv's own output statistics (mean m, std s) with gamma = s, beta = m — an identity on the
dense model. In training it renormalises the pruned output to the dense statistics; at the end it is folded back into
the Conv's weight and bias (per output channel, so the zeros of the masks stay zeros).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["FoldedBNRecalibration"]

EPS = 1e-5


class _Recorder(nn.Module):
    """Identity that accumulates per-channel sums of its input (N, C, ...) to get mean and variance."""

    def __init__(self):
        super().__init__()
        self.n, self.s, self.ss = 0, None, None

    def forward(self, y):
        dims = [d for d in range(y.dim()) if d != 1]
        flat = y.detach().double()
        s, ss = flat.sum(dims), (flat * flat).sum(dims)
        self.s = s if self.s is None else self.s + s
        self.ss = ss if self.ss is None else self.ss + ss
        self.n += y.numel() // y.shape[1]
        return y

    def stats(self):
        mean = self.s / self.n
        var = (self.ss / self.n - mean * mean).clamp_min(0)
        return mean.float(), var.float()


class FoldedBNRecalibration:
    """Attach training-time BatchNorms after `convs` ({node name: (weight Parameter, bias Parameter)}) of `student`."""

    def __init__(self, student, convs: dict, calibration_batches):
        self.student = student
        self.convs = dict(convs)
        self.norms: dict[str, nn.BatchNorm2d] = {}
        if not self.convs:
            return
        recorders = {name: _Recorder() for name in self.convs}
        was_training = student.training
        student.eval()
        for name, rec in recorders.items():
            student.attach_output_module(name, rec)
        with torch.no_grad():
            for batch in calibration_batches:
                student(batch)
        student.detach_output_modules()
        for name, rec in recorders.items():
            mean, var = rec.stats()
            std = (var + EPS).sqrt()
            bn = nn.BatchNorm2d(len(mean), eps=EPS, momentum=0.1)
            with torch.no_grad():
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.weight.copy_(std)
                bn.bias.copy_(mean)
            self.norms[name] = bn
            student.attach_output_module(name, bn)
        student.train(was_training)
        log.info("recalibrating %d Conv(s) whose BatchNormalization was folded at export", len(self.norms))

    def fold(self) -> None:
        """Fold each BatchNorm (running statistics, affine) into its Conv's weight and bias, then remove them."""
        with torch.no_grad():
            for name, bn in self.norms.items():
                weight, bias = self.convs[name]
                scale = bn.weight / (bn.running_var + bn.eps).sqrt()
                weight.mul_(scale.reshape(-1, *([1] * (weight.dim() - 1))).to(weight))
                bias.copy_(((bias - bn.running_mean) * scale + bn.bias).to(bias))
        self.student.detach_output_modules()
        self.norms = {}
