"""Names of ctprune's operators, importable without onnxscript (which takes seconds to import)."""

DOMAIN = "ai.ctprune"
OP_TYPE = "PatternConv"
VERSION = 1
MIN_OPSET = 13  # the oldest default-domain opset the PatternConv function is written for (Clip min/max as inputs)
