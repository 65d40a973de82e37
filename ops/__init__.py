"""ctprune's own ONNX operators (domain ai.ctprune): specs (*.md), names (names.py), reference semantics (reference.py).

The reference is imported on first use: it needs onnxscript, which is slow to import, and inference-only users
(ctprune.runtime) need only the names.
"""

from ctprune.ops.names import DOMAIN, MIN_OPSET, OP_TYPE, VERSION

_REFERENCE = ("PatternConv", "dense_weight_from_compact", "pattern_conv_function", "pattern_conv_numpy")

__all__ = ["DOMAIN", "MIN_OPSET", "OP_TYPE", "VERSION", *_REFERENCE]


def __getattr__(name):
    if name in _REFERENCE:
        from ctprune.ops import reference

        return getattr(reference, name)
    raise AttributeError(f"module 'ctprune.ops' has no attribute {name!r}")
