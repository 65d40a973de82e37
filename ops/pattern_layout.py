"""PatternConv's index attributes (PatternConv.md, "Attributes"): written compactly, read in either form.

A node names its kept kernels by two INTS attributes:
- `filter_runs`: [f0, n0, f1, n1, ...], the stored filters in storage order, each with its number of kept kernels
  (the per-kernel filter list as runs: the kernels are stored filter by filter);
- `kernel_codes`: one number per kept kernel, `input channel * P + pattern id` (P patterns in the library).
Each kept kernel costs an ONNX file about 2-3 bytes of index this way instead of 5-8 (the three per-kernel lists
ctprune wrote before, `kernel_filters`, `kernel_channels`, `kernel_patterns`, which the kernels still read): on a
pruned VGG-19 the index was a tenth of the file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

COMPACT = ("filter_runs", "kernel_codes")
PER_KERNEL = ("kernel_filters", "kernel_channels", "kernel_patterns")  # the older form


def encode(kernel_filters: Sequence[int], kernel_channels: Sequence[int], kernel_patterns: Sequence[int],
           num_patterns: int) -> dict[str, list[int]]:
    """The compact attributes for kernels given per kernel (in storage order: each filter's kernels contiguous)."""
    filters = np.asarray(kernel_filters, dtype=np.int64).reshape(-1)
    channels = np.asarray(kernel_channels, dtype=np.int64).reshape(-1)
    patterns = np.asarray(kernel_patterns, dtype=np.int64).reshape(-1)
    starts = np.flatnonzero(np.r_[True, filters[1:] != filters[:-1]]) if len(filters) else np.zeros(0, np.int64)
    counts = np.diff(np.r_[starts, len(filters)])
    runs = np.stack([filters[starts], counts], axis=1).reshape(-1)
    return {"filter_runs": runs.tolist(), "kernel_codes": (channels * int(num_patterns) + patterns).tolist()}


def decode(attributes: Mapping[str, Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kernel_filters, kernel_channels, kernel_patterns), int64 arrays, from a node's attributes in either form."""
    if not any(name in attributes for name in COMPACT):
        return tuple(np.asarray(attributes.get(name, []), dtype=np.int64).reshape(-1) for name in PER_KERNEL)
    runs = np.asarray(attributes.get("filter_runs", []), dtype=np.int64).reshape(-1, 2)
    codes = np.asarray(attributes.get("kernel_codes", []), dtype=np.int64).reshape(-1)
    filters = np.repeat(runs[:, 0], runs[:, 1])
    P = max(len(attributes["patterns"]) // 4, 1)  # as the function divides (an empty library has no codes)
    return filters, codes // P, codes % P


def kept_kernels(attributes: Mapping[str, Sequence[int]]) -> int:
    """K, the node's number of kept kernels, in either form."""
    if "kernel_codes" in attributes:
        return len(attributes["kernel_codes"])
    return len(attributes.get("kernel_filters", []))
