"""Masked dense 3x3 Conv weight <-> PatternConv's compact weights and attributes (ops/PatternConv.md).

A layer's pruning is described by `LayerPatterns`: a pattern library (P, 4) of tap indices (ky*3 + kx) and an (O, C)
assignment of a pattern id to every kernel, -1 where the whole kernel was removed. `compact_from_dense` keeps, for every
kept kernel, the 4 weights at its pattern's taps, in the spec's storage order: filters by decreasing number of kept
kernels (ties: lower filter first), inside a filter by pattern id, then input channel. A layer pruned in blocks of
filters that share every kernel (`LayerPatterns.blocks`, `--block N`) breaks the ties by block id first, so a block's
filters stand next to each other with the same kernel list (the kernel computes such a run of filters together);
the graph's output channels keep their order (kernel_filters names each filter).

Weights outside the assigned taps: by default they must already be zero (the weight is the hard-masked one the
pruning engine trained), and a nonzero there raises GraphError, because dropping it silently would make the output
model differ from the model the caller evaluated. Pass `require_masked=False` to mask on the way (one-shot pruning).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctprune.errors import GraphError
from ctprune.ops import pattern_layout

PLACEHOLDER_PATTERN = (1, 3, 4, 5)


@dataclass(frozen=True)
class LayerPatterns:
    """One 3x3 Conv's pattern pruning: `library` (P, 4) int taps in 0..8; `assignment` (O, C) int, -1 = kernel removed;
    `blocks` (O,) int block id per filter, or None (each filter alone)."""

    library: np.ndarray
    assignment: np.ndarray
    blocks: np.ndarray | None = None

    def kept_kernels(self) -> int:
        return int((np.asarray(self.assignment) >= 0).sum())

    def mask(self) -> np.ndarray:
        """The (O, C, 3, 3) 0/1 float32 mask these patterns keep."""
        library, assignment = _checked(self.library, self.assignment, "layer")
        mask = np.zeros(assignment.shape + (9,), dtype=np.float32)
        filters, channels = np.nonzero(assignment >= 0)
        mask[filters[:, None], channels[:, None], library[assignment[filters, channels]]] = 1.0
        return mask.reshape(assignment.shape + (3, 3))


@dataclass(frozen=True)
class CompactPatternWeights:
    """PatternConv's compact form of one weight: `weights` (K, 4) float32 plus the node attributes that index it."""

    weights: np.ndarray
    weight_shape: tuple[int, int, int, int]
    patterns: np.ndarray  # (P, 4) int64, each row ascending
    kernel_filters: np.ndarray  # (K,) int64
    kernel_channels: np.ndarray  # (K,) int64
    kernel_patterns: np.ndarray  # (K,) int64

    def attributes(self) -> dict[str, list[int]]:
        """The spec's index attributes (the compact form, ctprune.ops.pattern_layout), as plain int lists ready for
        onnx.helper.make_node."""
        return {
            "weight_shape": [int(v) for v in self.weight_shape],
            "patterns": np.asarray(self.patterns, dtype=np.int64).ravel().tolist(),
            **pattern_layout.encode(self.kernel_filters, self.kernel_channels, self.kernel_patterns,
                                    len(self.patterns)),
        }


def _checked(library, assignment, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate a pattern library and an assignment; return them as int64 arrays, library rows sorted ascending."""
    library = np.asarray(library)
    assignment = np.asarray(assignment)
    if library.ndim != 2 or library.shape[1] != 4:
        raise GraphError(f"{where}: the pattern library must have shape (P, 4), got {library.shape}")
    if not np.issubdtype(library.dtype, np.integer) or not np.issubdtype(assignment.dtype, np.integer):
        raise GraphError(f"{where}: the pattern library and the assignment must be integer arrays")
    library = np.sort(library.astype(np.int64), axis=1)
    if library.shape[0] == 0:
        # A layer whose kernels were all removed uses no pattern; one placeholder row keeps P >= 1 for the kernels.
        library = np.array([PLACEHOLDER_PATTERN], dtype=np.int64)
    if library.min() < 0 or library.max() > 8 or (np.diff(library, axis=1) == 0).any():
        bad = int(np.nonzero((library.min(axis=1) < 0) | (library.max(axis=1) > 8) | (np.diff(library, axis=1) == 0).any(axis=1))[0][0])
        raise GraphError(f"{where}: pattern {bad} of the library must be 4 distinct taps in 0..8, got {library[bad].tolist()}")
    if assignment.ndim != 2:
        raise GraphError(f"{where}: the assignment must have shape (O, C), got {assignment.shape}")
    assignment = assignment.astype(np.int64)
    if assignment.size and (assignment.min() < -1 or assignment.max() >= len(library)):
        raise GraphError(
            f"{where}: assignment holds pattern ids in {assignment.min()}..{assignment.max()}, "
            f"but the library has {len(library)} patterns (ids 0..{len(library) - 1}, -1 = removed)"
        )
    return library, assignment


def compact_from_dense(
    weight: np.ndarray, patterns: LayerPatterns, *, require_masked: bool = True, where: str = "Conv"
) -> CompactPatternWeights:
    """Compact a masked dense (O, C, 3, 3) weight by `patterns`; `where` names the layer in error messages."""
    weight = np.asarray(weight)
    if weight.ndim != 4 or weight.shape[2:] != (3, 3):
        raise GraphError(f"{where}: PatternConv needs a (O, C, 3, 3) weight, got shape {weight.shape}")
    library, assignment = _checked(patterns.library, patterns.assignment, where)
    O, C = weight.shape[:2]
    if assignment.shape != (O, C):
        raise GraphError(f"{where}: the assignment has shape {assignment.shape}, the weight has (O, C) = {(O, C)}")

    kept = assignment >= 0
    per_filter = kept.sum(axis=1)
    filter_rank = np.empty(O, dtype=np.int64)
    if patterns.blocks is None:
        keys = (np.arange(O), -per_filter)  # decreasing kept kernels, then filter id
    else:
        blocks = np.asarray(patterns.blocks)
        if blocks.shape != (O,) or not np.issubdtype(blocks.dtype, np.integer):
            raise GraphError(f"{where}: the filter blocks must be {O} integers (one per filter), got shape {blocks.shape}")
        keys = (np.arange(O), blocks.astype(np.int64), -per_filter)  # decreasing kept kernels, block, filter id
    filter_rank[np.lexsort(keys)] = np.arange(O)
    filters, channels = np.nonzero(kept)
    pattern_ids = assignment[filters, channels]
    order = np.lexsort((channels, pattern_ids, filter_rank[filters]))  # last key is the primary one
    filters, channels, pattern_ids = filters[order], channels[order], pattern_ids[order]

    flat = weight.reshape(O, C, 9)
    taps = library[pattern_ids]  # (K, 4)
    compact = flat[filters[:, None], channels[:, None], taps].astype(np.float32)

    if require_masked:
        leftover = flat.copy()
        leftover[filters[:, None], channels[:, None], taps] = 0
        if np.any(leftover != 0):
            o, c, t = (int(v[0]) for v in np.nonzero(leftover))
            raise GraphError(
                f"{where}: the weight has {int(np.count_nonzero(leftover))} nonzero value(s) outside the assigned "
                f"patterns (first: filter {o}, channel {c}, tap {t}); pass the hard-masked weight or "
                "require_masked=False to drop them"
            )
    return CompactPatternWeights(
        weights=compact.reshape(-1, 4),
        weight_shape=(int(O), int(C), 3, 3),
        patterns=library,
        kernel_filters=filters.astype(np.int64),
        kernel_channels=channels.astype(np.int64),
        kernel_patterns=pattern_ids.astype(np.int64),
    )


def dense_from_compact(compact: CompactPatternWeights) -> np.ndarray:
    """The dense (O, C, 3, 3) float32 weight a compact form stands for (zeros outside the kept taps)."""
    O, C = compact.weight_shape[:2]
    dense = np.zeros((O, C, 9), dtype=np.float32)
    taps = compact.patterns[compact.kernel_patterns]
    dense[compact.kernel_filters[:, None], compact.kernel_channels[:, None], taps] = compact.weights.reshape(-1, 4)
    return dense.reshape(O, C, 3, 3)


def patterns_from_compact(compact: CompactPatternWeights) -> LayerPatterns:
    """The LayerPatterns a compact form was made with (library rows as stored: ascending)."""
    O, C = compact.weight_shape[:2]
    assignment = np.full((O, C), -1, dtype=np.int64)
    assignment[compact.kernel_filters, compact.kernel_channels] = compact.kernel_patterns
    return LayerPatterns(library=compact.patterns.copy(), assignment=assignment)
