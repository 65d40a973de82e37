"""SparseConv inside onnxruntime-gpu: a session on CUDAExecutionProvider runs ctprune's SparseConv CUDA kernels (no CPU
fallback allowed: I and P are declared host inputs, everything else stays on the device) and matches numpy's float64
reference on the masked dense weight, for Conv and FC layers at every block size.

Skips unless onnxruntime-gpu (CUDAExecutionProvider), a CUDA GPU and a kernel library built with CTPRUNE_CUDA=1 are
all here (the same conditions as tests/test_cuda_session.py)."""

import math

import numpy as np
import onnxruntime as ort
import pytest

from ctprune.lab.cuda_sparse_harness import random_sparse_layer, reference
from ctprune.lab.layer_model import sparse_conv_layer_model

from test_cuda_session import LIBRARY, REASON, cuda_session
from test_cuda_emulated_sparse import SEED

pytestmark = pytest.mark.skipif(LIBRARY is None, reason=REASON or "n/a")

CASES = [  # (weight_shape, x_shape, group, strides, pads, dilations)
    ((64, 32, 1, 1), (2, 32, 14, 14), 1, (1, 1), (0, 0, 0, 0), (1, 1)),
    ((24, 8, 3, 3), (1, 16, 11, 9), 2, (2, 1), (1, 1, 1, 1), (1, 2)),
    ((40, 300), (3, 300), 1, (1, 1), (0, 0, 0, 0), (1, 1)),
]


@pytest.mark.parametrize("block", [1, 2, 4, 8])
@pytest.mark.parametrize("index", range(len(CASES)))
def test_session_matches_the_reference(index, block):
    weight_shape, x_shape, group, strides, pads, dilations = CASES[index]
    rng = np.random.default_rng([SEED, index, block])
    layer = random_sparse_layer(rng, weight_shape, 4.0, block, group=group, strides=strides, pads=pads,
                                dilations=dilations, activation=(0.0, math.inf))
    from ctprune.rewrite.sparse_conv import Activation

    model = sparse_conv_layer_model(layer.compact, x_shape, layer.bias, strides, pads, dilations, Activation.relu(),
                                    function=False)
    x = rng.standard_normal(x_shape).astype(np.float32)
    y = cuda_session(model).run(None, {"X": x})[0]
    want = reference(layer, x)
    err = float(np.abs(y.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-30))
    assert not np.isnan(y).any() and err <= 1e-5, f"seed {SEED}, case {CASES[index]}, block {block}: {err:.2e}"
