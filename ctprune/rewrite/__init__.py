"""Graph rewrites that make pruned models fast: Conv -> ai.ctprune.PatternConv (pattern_conv.py converts one weight,
model.py rewrites a whole model)."""

from ctprune.rewrite.model import rewrite_model
from ctprune.rewrite.pattern_conv import (
    CompactPatternWeights,
    LayerPatterns,
    compact_from_dense,
    dense_from_compact,
    patterns_from_compact,
)

__all__ = [
    "CompactPatternWeights",
    "LayerPatterns",
    "compact_from_dense",
    "dense_from_compact",
    "patterns_from_compact",
    "rewrite_model",
]
