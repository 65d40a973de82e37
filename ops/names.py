"""Names of ctprune's operators, importable without onnxscript (which takes seconds to import)."""

import itertools

DOMAIN = "ai.ctprune"
OP_TYPE = "PatternConv"
VERSION = 1
MIN_OPSET = 13  # the oldest default-domain opset the PatternConv function is written for (Clip min/max as inputs)
# A PatternConv pattern keeps 4 of a 3x3 kernel's 9 taps (each ky*3 + kx, ascending): the 126 possible shapes, in
# lexicographic order. The one table the pruning engine, the lab's layer builders and the tests draw from.
PATTERN_TAPS, PATTERN_KEEP = 9, 4
ALL_PATTERNS = tuple(itertools.combinations(range(PATTERN_TAPS), PATTERN_KEEP))

# ai.ctprune.SparseConv (ops/SparseConv.md): a Conv or Gemm whose kept weights are stored compactly, in blocks of
# output channels that share one sparsity pattern. Same domain and version as PatternConv.
SPARSE_OP_TYPE = "SparseConv"
SPARSE_MIN_OPSET = 13  # the oldest default-domain opset its function is written for
SPARSE_BLOCKS = (1, 2, 4, 8)  # output channels per block
# The `activation` attribute: what multiplies the clipped output c = clip(conv + Z, activation_min, activation_max).
ACTIVATION_NONE = 0  # y = c (none, Relu, Relu6 / Clip are all expressed by the bounds)
ACTIVATION_HARDSIGMOID_MUL = 1  # y = c * HardSigmoid(c, activation_alpha, activation_beta) (HardSwish: 1/6, 0.5)
ACTIVATION_SIGMOID_MUL = 2  # y = c * Sigmoid(c) (SiLU / Swish)
