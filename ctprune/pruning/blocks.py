"""Blocks of similar filters for `--block N`: filters of one block share every kernel (the same input channels, the
same pattern per channel), so a PatternConv kernel can compute the block's N outputs from one load of each input.

The blocks are chosen once per layer, from the weights before the first selection, and then held fixed: the soft
phase's re-selections change which kernels a block keeps, never which filters form it.

Clustering, greedy and deterministic: a block is seeded with the strongest remaining filter (largest L2 norm, ties to
the lower index) and grows one filter at a time by the remaining filter closest to the block, by cosine similarity of
per-kernel L2-norm vectors over the input channels (a filter as "how much it reads each input channel") to the
block's summed unit vectors. Kernel norms, not the single taps, because the choice a block shares first is which
channels it keeps; they are also a ninth of the weights' size. The last block holds what is left (O mod N filters).
Block ids count from 0 in the order the blocks are made (the strongest first).
"""

from __future__ import annotations

import math

import numpy as np
import torch

BLOCK_SIZES = (1, 4, 8, 16)  # the PatternConv kernel's register tiles; 1 = no blocks


def filter_blocks(weight: torch.Tensor, block: int) -> np.ndarray:
    """(O, C, 3, 3) weight -> (O,) int64 block id per filter: ceil(O / block) blocks of `block` filters (the last
    may be smaller)."""
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    o = weight.shape[0]
    with torch.no_grad():
        norms = torch.linalg.vector_norm(weight.detach().reshape(o, weight.shape[1], -1).float(), dim=-1).cpu()
    strength = norms.square().sum(1)
    unit = norms / torch.linalg.vector_norm(norms, dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    ids = np.full(o, -1, dtype=np.int64)
    taken = torch.zeros(o, dtype=torch.bool)
    for b in range(math.ceil(o / block)):
        seed = int(torch.argmax(strength.masked_fill(taken, -math.inf)))  # argmax: the first of equal maxima
        ids[seed], taken[seed] = b, True
        centre = unit[seed].clone()
        for _ in range(min(block, o - b * block) - 1):
            pick = int(torch.argmax((unit @ centre).masked_fill(taken, -math.inf)))
            ids[pick], taken[pick] = b, True
            centre += unit[pick]
    return ids


def block_rows(ids: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(O,) block ids -> (blocks,) filters per block."""
    return torch.bincount(torch.as_tensor(ids, dtype=torch.int64))


def block_sum(view: torch.Tensor, ids: torch.Tensor, blocks: int) -> torch.Tensor:
    """(O, ...) per-filter importance -> (blocks, ...) summed over each block's filters."""
    out = torch.zeros((blocks, *view.shape[1:]), dtype=torch.float32, device=view.device)
    return out.index_add_(0, ids.to(view.device), view.detach().float())
