"""ctprune's own ONNX operators (domain ai.ctprune): specs (*.md) and reference semantics (reference.py)."""

from ctprune.ops.reference import (
    DOMAIN,
    MIN_OPSET,
    OP_TYPE,
    VERSION,
    PatternConv,
    dense_weight_from_compact,
    pattern_conv_function,
    pattern_conv_numpy,
)

__all__ = [
    "DOMAIN",
    "MIN_OPSET",
    "OP_TYPE",
    "VERSION",
    "PatternConv",
    "dense_weight_from_compact",
    "pattern_conv_function",
    "pattern_conv_numpy",
]
