"""Kernel patterns: which 4 of a 3x3 kernel's 9 taps survive, and the small library a network's kernels share.

A tap is numbered ky*3 + kx (0..8). A pattern is the ascending tuple of its 4 taps, stored as one row of a (P, 4) int
array; as a 9-bit code (bit t set = tap t kept) when counting. ClickTrain generates the library from the network
itself: every kernel votes for the shape of its own 4 most important taps, and the K most voted shapes become the
library (issue 4; mission.md). Each kernel then takes the library pattern that keeps the most of its importance.

Shapes: importance tensors are (O, C, 9) — one row of 9 tap scores per kernel (filter o, input channel c).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from ctprune.errors import RatioError
from ctprune.ops.names import ALL_PATTERNS as SPEC_PATTERNS
from ctprune.ops.names import PATTERN_KEEP, PATTERN_TAPS

log = logging.getLogger(__name__)

TAPS, KEEP = PATTERN_TAPS, PATTERN_KEEP
ALL_PATTERNS = np.array(SPEC_PATTERNS, dtype=np.int64)  # (126, 4), ascending (ops/names.py)
MAX_PATTERNS = len(ALL_PATTERNS)


def pattern_codes(library: np.ndarray) -> np.ndarray:
    """(P, 4) taps -> (P,) 9-bit codes."""
    return (1 << np.asarray(library, dtype=np.int64)).sum(axis=1)


def codes_to_patterns(codes: Iterable[int]) -> np.ndarray:
    """9-bit codes (4 bits set each) -> (P, 4) ascending taps."""
    rows = [[t for t in range(TAPS) if (int(code) >> t) & 1] for code in codes]
    return np.array(rows, dtype=np.int64).reshape(-1, KEEP)


def pattern_onehot(library: np.ndarray, device=None, dtype=torch.float32) -> torch.Tensor:
    """(P, 4) taps -> (9, P) 0/1 matrix: importance (..., 9) @ it = importance kept by each pattern (..., P)."""
    lib = torch.as_tensor(np.asarray(library, dtype=np.int64), device=device)
    onehot = torch.zeros(TAPS, lib.shape[0], dtype=dtype, device=device)
    onehot.scatter_(0, lib.T, 1.0)
    return onehot


def top4_codes(importance: torch.Tensor) -> torch.Tensor:
    """(..., 9) importance -> (...) int64 code of each kernel's 4 most important taps (ties: lower tap first)."""
    # Stable descending sort so equal scores (e.g. all-zero kernels) pick the same taps every time.
    order = torch.sort(importance, dim=-1, descending=True, stable=True).indices[..., :KEEP]
    return (torch.ones_like(order) << order).sum(dim=-1)


class PatternLibrary:
    """The network-wide set of allowed 4-tap patterns, most frequent first.

    >>> imp = torch.zeros(2, 3, 9); imp[..., [0, 1, 3, 4]] = 1.0   # every kernel prefers the top-left square
    >>> PatternLibrary.generate({"conv": imp}, size=1).patterns.tolist()
    [[0, 1, 3, 4]]
    """

    def __init__(self, patterns: np.ndarray):
        patterns = np.asarray(patterns, dtype=np.int64).reshape(-1, KEEP)
        if len(patterns) == 0:
            raise RatioError("the pattern library is empty: --patterns must be at least 1.")
        if (patterns < 0).any() or (patterns >= TAPS).any() or (np.diff(patterns, axis=1) <= 0).any():
            raise ValueError(f"patterns must hold 4 ascending taps in 0..8, got {patterns.tolist()}")
        if len(set(pattern_codes(patterns).tolist())) != len(patterns):
            raise ValueError(f"pattern library holds duplicates: {patterns.tolist()}")
        self.patterns = patterns

    def __len__(self) -> int:
        return len(self.patterns)

    @classmethod
    def empty(cls) -> "PatternLibrary":
        """The library of a model with no pattern-pruned layer (only sparse ones)."""
        library = cls.__new__(cls)
        library.patterns = np.zeros((0, KEEP), dtype=np.int64)
        return library

    def __repr__(self) -> str:
        return f"PatternLibrary({self.patterns.tolist()})"

    @classmethod
    def generate(
        cls,
        importance: Mapping[str, torch.Tensor],
        size: int = 8,
        voters: Mapping[str, torch.Tensor] | None = None,
    ) -> "PatternLibrary":
        """The `size` most frequent top-4 shapes over all kernels of all layers.

        importance: {layer: (O, C, 9)}. voters: optional {layer: (O, C) bool} — only these kernels vote (e.g. the
        kernels connectivity pruning keeps, so removed kernels do not shape the library). Shapes nobody voted for fill
        the library when fewer than `size` distinct shapes exist, ranked by the importance they would keep over the
        whole network (each layer normalised to sum 1 so no layer dominates by scale).
        """
        if not 1 <= size <= MAX_PATTERNS:
            raise RatioError(f"--patterns must be between 1 and {MAX_PATTERNS} (the 4-of-9 shapes), got {size}.")
        votes = np.zeros(1 << TAPS, dtype=np.int64)
        kept_mass = np.zeros(MAX_PATTERNS, dtype=np.float64)
        all_onehot = None
        for name, imp in importance.items():
            imp = imp.detach().float()
            codes = top4_codes(imp)
            if voters is not None and name in voters:
                codes = codes[voters[name].to(codes.device)]
            votes += np.bincount(codes.reshape(-1).cpu().numpy(), minlength=1 << TAPS)
            if all_onehot is None or all_onehot.device != imp.device:
                all_onehot = pattern_onehot(ALL_PATTERNS, device=imp.device, dtype=torch.float64)
            per_tap = imp.reshape(-1, TAPS).double().sum(dim=0)
            total = per_tap.sum()
            if total > 0:
                kept_mass += (per_tap / total @ all_onehot).cpu().numpy()
        all_codes = pattern_codes(ALL_PATTERNS)
        # Rank all 126 shapes: votes first, then kept importance mass, then code (deterministic on exact ties).
        order = sorted(range(MAX_PATTERNS), key=lambda i: (-votes[all_codes[i]], -kept_mass[i], all_codes[i]))
        chosen = ALL_PATTERNS[order[:size]]
        voted = int((votes[all_codes[order[:size]]] > 0).sum())
        if voted < size:
            log.info("only %d distinct kernel shapes voted; %d library patterns filled by importance mass", voted, size - voted)
        return cls(chosen)

    def assign(self, importance: torch.Tensor) -> torch.Tensor:
        """(O, C, 9) importance -> (O, C) int64 id of the library pattern keeping the most importance (ties: lower id)."""
        onehot = pattern_onehot(self.patterns, device=importance.device, dtype=importance.dtype)
        return torch.argmax(importance @ onehot, dim=-1)  # argmax returns the first maximum

    def kept_importance(self, importance: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
        """(O, C, 9), (O, C) ids -> (O, C) importance on each kernel's assigned taps."""
        return (importance * self.tap_masks(assignment, dtype=importance.dtype)).sum(dim=-1)

    def tap_masks(self, assignment: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """(O, C) ids -> (O, C, 9) 0/1 masks of the kept taps."""
        onehot = pattern_onehot(self.patterns, device=assignment.device, dtype=dtype)  # (9, P)
        return onehot.T[assignment]

    def to_list(self) -> list[list[int]]:
        return self.patterns.tolist()
