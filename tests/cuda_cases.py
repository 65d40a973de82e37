"""Cases shared by the GPU kernel's two test files: emulated on the CPU (test_cuda_emulated.py) and run on a GPU
(test_cuda_kernel.py), so both check the same shapes."""

import math

import numpy as np

from ctprune.lab.cuda_harness import layer_from_compact, random_layer

from test_patternconv_matrix import ACTIVATIONS, CASES, SEED, build

# Shapes that leave partial tiles in every dimension, O not a multiple of any filter group, asymmetric pads:
# (N, C, O, H, W, strides, pads, activation range).
ODD_TILE_SHAPES = [
    (3, 13, 20, 11, 10, (1, 1), (1, 1, 1, 1), (-math.inf, math.inf)),
    (2, 9, 37, 7, 7, (1, 1), (1, 1, 1, 1), (0.0, math.inf)),
    (5, 6, 10, 9, 40, (2, 1), (0, 2, 1, 0), (0.0, 6.0)),
    (1, 17, 9, 70, 3, (1, 2), (2, 0, 0, 1), (-0.3, 0.4)),
    (2, 5, 33, 1, 1, (1, 1), (1, 1, 1, 1), (-math.inf, math.inf)),
]


# A fused residual Add: (N, C, O, H, W, strides, pads, activation, bias, Z, force_config), Z "full" (Y's shape) or
# "one" (one element, added everywhere); split configs (> 100) run the partial-sum reduction's epilogue.
RESIDUAL_SHAPES = [
    (2, 13, 20, 11, 10, (1, 1), (1, 1, 1, 1), "none", True, "full", 0),
    (3, 9, 37, 7, 7, (1, 1), (1, 1, 1, 1), "relu", False, "full", 0),
    (1, 6, 10, 9, 40, (2, 1), (0, 2, 1, 0), "relu6", True, "one", 0),
    (2, 17, 9, 12, 5, (1, 2), (2, 0, 0, 1), "none", False, "one", 0),
    (2, 11, 21, 6, 9, (1, 1), (1, 1, 1, 1), "relu6", False, "full", 24),
    (1, 70, 40, 7, 7, (1, 1), (1, 1, 1, 1), "relu6", True, "full", 344),
    (2, 13, 9, 5, 11, (1, 1), (1, 1, 1, 1), "relu", False, "one", 211),
    (1, 64, 33, 4, 4, (1, 1), (1, 1, 1, 1), "clip", True, "full", 811),
    (1, 40, 17, 6, 6, (2, 2), (1, 1, 1, 1), "none", False, "full", 422),
]


def residual_case(index: int):
    """(layer, x, z, force_config, where) for RESIDUAL_SHAPES[index]: 4x, a fifth of the filters empty (bias + Z)."""
    n, c, o, h, w, strides, pads, act, bias, z_kind, config = RESIDUAL_SHAPES[index]
    rng = np.random.default_rng(SEED + 1000 + index)
    layer = random_layer(o, c, 4.0, rng, bias=bias, strides=strides, pads=pads, activation=ACTIVATIONS[act],
                         empty_filters=o // 5)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    z = rng.standard_normal((n, o, *layer.output_size(h, w)) if z_kind == "full" else (1,)).astype(np.float32)
    return layer, x, z, config, (f"seed {SEED + 1000 + index} (CTPRUNE_TEST_SEED={SEED}), config {config}, "
                                 f"shape {(n, c, o, h, w, strides, pads)}, {act}, bias {bias}, Z {z_kind}")


def matrix_case(index: int):
    """(layer, x, where) for case `index` of the CPU kernel's randomized matrix (tests/test_patternconv_matrix.py)."""
    case = CASES[index]
    _, _, compact, x = build(case, SEED + index)
    rng = np.random.default_rng(SEED + index)
    bias = rng.standard_normal(case["O"]).astype(np.float32) if case["bias"] else None
    layer = layer_from_compact(compact, bias, (case["stride"],) * 2, (case["pad"],) * 4, ACTIVATIONS[case["activation"]])
    return layer, x, f"seed {SEED + index} (CTPRUNE_TEST_SEED={SEED}), case {case}"


def odd_tile_cases(config: int, shapes=ODD_TILE_SHAPES):
    """(layer, x, where) for a forced tile configuration on each of `shapes` (4x, a fifth of the filters empty)."""
    rng = np.random.default_rng(SEED + config)
    for n, c, o, h, w, strides, pads, act in shapes:
        layer = random_layer(o, c, 4.0, rng, strides=strides, pads=pads, activation=act, empty_filters=o // 5)
        x = rng.standard_normal((n, c, h, w)).astype(np.float32)
        yield layer, x, f"config {config}, shape {(n, c, o, h, w, strides, pads)}"
