"""The SparseConv CUDA kernels on a GPU, through their C ABI (ctprune.lab.cuda_sparse_harness), against torch's conv2d
and linear on the GPU (cuDNN / cuBLAS float32 with TF32 off) and a float64 reference.

Skips without a CUDA GPU or without nvcc. Cases: the emulator's randomized Conv and FC layers (every block size and
activation, groups, dilations, strides, pads, a residual Z), the benchmark's shapes (MobileNetV2 / ResNet-50 1x1 layers,
VGG and MobileNet FC layers) at batch 1 and 32 and 2x/4x/8x, and NaN/Inf inputs (masks as numpy's). Every output
buffer starts as NaN, so an element the kernels never write shows. The bar (issue 19): max relative error <= 1e-5,
scaled by the pre-activation output."""

import math
import shutil

import numpy as np
import pytest
import torch

from ctprune.lab.cuda_sparse_harness import CudaSparseConv, build_sparse_cuda_kernel, random_sparse_layer, reference

from test_cuda_emulated_sparse import ACTIVATIONS, BLOCKS, SEED, assert_same, random_conv, random_fc, residual

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (torch.cuda.is_available() is False)"),
    pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: the harness builds the kernel with it"),
]

POINTWISE = [(32, 16, 112), (96, 24, 56), (144, 32, 28), (192, 64, 14), (576, 160, 7), (256, 64, 56), (1024, 256, 14),
             (2048, 512, 7)]  # (C, O, H = W)
FC = [(4096, 25088), (4096, 4096), (1000, 1280)]  # (O, I)


@pytest.fixture(scope="module")
def library():
    return build_sparse_cuda_kernel()


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def run(layer, x: np.ndarray, library, z: np.ndarray | None = None, w: np.ndarray | None = None) -> np.ndarray:
    kernel = CudaSparseConv(layer, library)
    xt = torch.from_numpy(x).cuda()
    wt = torch.from_numpy(np.ascontiguousarray(layer.weights if w is None else w)).cuda()
    bt = None if layer.bias is None else torch.from_numpy(layer.bias).cuda()
    zt = None if z is None else torch.from_numpy(z).cuda()
    o = int(layer.compact.weight_shape[0])
    shape = (x.shape[0], o) if layer.fc else (x.shape[0], o) + layer.output_size(x.shape[2], x.shape[3])
    y = kernel(xt, wt, bt, zt, out=torch.full(shape, math.nan, device="cuda"))
    torch.cuda.synchronize()
    kernel.close()
    return y.cpu().numpy()


def torch_reference(layer, x: np.ndarray) -> np.ndarray:
    """cuDNN / cuBLAS float32 on the masked dense weight (no activation: the bench's layers have none)."""
    c = layer.compact
    dense = torch.from_numpy(c.dense()).cuda()
    xt = torch.from_numpy(x).cuda()
    b = None if layer.bias is None else torch.from_numpy(layer.bias).cuda()
    if layer.fc:
        return torch.nn.functional.linear(xt, dense, b).cpu().numpy()
    top, left, bottom, right = layer.pads
    xp = torch.nn.functional.pad(xt, (left, right, top, bottom))
    return torch.nn.functional.conv2d(xp, dense, b, stride=layer.strides, dilation=layer.dilations,
                                      groups=c.group).cpu().numpy()


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("kind", ["conv", "fc"])
def test_random_layers(library, kind, block, activation):
    rng = np.random.default_rng([SEED, BLOCKS.index(block), list(ACTIVATIONS).index(activation), kind == "fc"])
    for _ in range(4):
        layer, x, where = (random_conv if kind == "conv" else random_fc)(rng, block, activation)
        z = residual(rng, layer, x)
        assert_same(run(layer, x, library, z), reference(layer, x, z), where)


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("ratio", [2.0, 4.0, 8.0])
def test_benchmark_shapes_against_cudnn(library, ratio, batch):
    rng = np.random.default_rng([SEED, int(ratio), batch])
    cases = [((o, c, 1, 1), (batch, c, h, h), 4) for c, o, h in POINTWISE]
    cases += [((o, i), (batch, i), 8) for o, i in FC]
    for weight_shape, x_shape, block in cases:
        layer = random_sparse_layer(rng, weight_shape, ratio, block)
        x = rng.standard_normal(x_shape).astype(np.float32)
        got, want = run(layer, x, library), torch_reference(layer, x)
        error = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
        assert not np.isnan(got).any() and error <= 1e-5, f"seed {SEED}: {weight_shape} x {x_shape}: {error:.2e}"


def test_nan_and_inf_follow_onnx(library):
    rng = np.random.default_rng([SEED, 77])
    for kind in ("conv", "fc"):
        for block in BLOCKS:
            layer, x, where = (random_conv if kind == "conv" else random_fc)(rng, block, "relu")
            x.reshape(-1)[rng.integers(0, x.size, 3)] = [np.nan, np.inf, -np.inf]
            assert_same(run(layer, x, library), reference(layer, x), where + " (non-finite X)")
