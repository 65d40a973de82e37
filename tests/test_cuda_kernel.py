"""The PatternConv CUDA kernel on a GPU, through its C ABI (ctprune.lab.cuda_harness), against torch's conv2d on the GPU.

Skips without a CUDA GPU (torch.cuda.is_available()) or without nvcc. Cases: the CPU kernel's randomized matrix
(tests/test_patternconv_matrix.py), every tile configuration forced, the benchmark's layers at batch 1 and 32 and
2.25x/4x/8x, and a fused residual Z. Every output buffer starts as NaN, so an element the kernel never writes shows.
The bar (issue 6): max relative error <= 1e-5 against cuDNN float32 with TF32 off, and against a float64 reference
(errors scaled by the pre-activation output, whose size sets float32 rounding; see test_cuda_emulated.py)."""

import math
import shutil

import numpy as np
import pytest
import torch

from ctprune.lab.cuda_harness import (KERNEL_CONFIGS, SPLIT_CONFIGS, CudaPatternConv, KernelCallError, build_cuda_kernel, dense_weight,
                                  random_layer)

from cuda_cases import ODD_TILE_SHAPES, RESIDUAL_SHAPES, matrix_case, odd_tile_cases, residual_case
from test_patternconv_matrix import CASES, SEED, _ids

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (torch.cuda.is_available() is False)"),
    pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: the harness builds the kernel with it"),
]

BENCH_LAYERS = [(64, 56), (64, 32), (128, 28), (128, 16), (256, 14), (256, 8), (512, 7), (512, 4)]


@pytest.fixture(scope="module")
def library():
    return build_cuda_kernel()


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def references(layer, x: torch.Tensor, z: torch.Tensor | None = None):
    """(cuDNN float32 clamped, float64 clamped, float64 before the clamp) of conv2d + the residual z, on the GPU."""
    top, left, bottom, right = layer.pads
    out = []
    for dtype in (torch.float32, torch.float64):
        xp = torch.nn.functional.pad(x.to(dtype), (left, right, top, bottom))
        w = torch.from_numpy(dense_weight(layer)).to(x.device, dtype)
        b = None if layer.bias is None else torch.from_numpy(layer.bias).to(x.device, dtype)
        y = torch.nn.functional.conv2d(xp, w, b, stride=layer.strides)
        out.append(y if z is None else y + z.to(dtype))  # one element broadcasts
    clamp = lambda y: y.clamp(layer.activation_min, layer.activation_max)
    return clamp(out[0]), clamp(out[1]), out[1]


def run_kernel(layer, x: torch.Tensor, library, force_config=0, z: torch.Tensor | None = None):
    kernel = CudaPatternConv(layer, library)
    w = torch.from_numpy(layer.weights).cuda()
    b = None if layer.bias is None else torch.from_numpy(layer.bias).cuda()
    n, _, h, wd = x.shape
    oh, ow = layer.output_size(h, wd)
    out = torch.full((n, layer.weight_shape[0], oh, ow), math.nan, device=x.device)
    kernel(x, w, b, z, out=out, force_config=force_config)
    torch.cuda.synchronize()
    kernel.close()
    return out


def check(layer, x_np, library, where, force_config=0, z_np=None):
    x = torch.from_numpy(x_np).cuda()
    z = None if z_np is None else torch.from_numpy(z_np).cuda()
    y = run_kernel(layer, x, library, force_config, z)
    ref32, ref64, unclamped = references(layer, x, z)
    assert y.shape == ref32.shape, where
    unwritten = int(torch.isnan(y).sum())
    assert unwritten == 0, f"{unwritten} output elements unwritten: {where}"
    scale = max(float(unclamped.abs().max()), 1e-30)
    err64 = float((y.double() - ref64).abs().max()) / scale
    err32 = float((y - ref32).abs().max()) / scale
    assert err64 <= 1e-5, f"vs float64: rel err {err64:.2e}: {where}"
    assert err32 <= 1e-5, f"vs cuDNN float32 (TF32 off): rel err {err32:.2e}: {where}"


@pytest.mark.parametrize("index", range(len(CASES)), ids=_ids(CASES))
def test_matrix_case(library, index):
    layer, x, where = matrix_case(index)
    check(layer, x, library, where)


@pytest.mark.parametrize("config", KERNEL_CONFIGS)
def test_every_tile_config(library, config):
    shapes = ODD_TILE_SHAPES + [(32, 64, 64, 56, 56, (1, 1), (1, 1, 1, 1), (0.0, math.inf))]  # and a large batch
    for layer, x, where in odd_tile_cases(config, shapes):
        check(layer, x, library, where, force_config=config)


@pytest.mark.parametrize("config", SPLIT_CONFIGS)
def test_channel_splits(library, config):
    # Partial sums reduced by the last-arriving block of each tile; run twice so a ticket left non-zero would show.
    rng = np.random.default_rng(SEED + config)
    for n, c, o, h, w in [(1, 70, 40, 7, 7), (2, 13, 9, 5, 11), (1, 3, 17, 4, 4), (1, 512, 512, 7, 7)]:
        layer = random_layer(o, c, 8.0, rng, activation=(0.0, 6.0), empty_filters=o // 6)
        x = rng.standard_normal((n, c, h, w)).astype(np.float32)
        for attempt in range(2):
            check(layer, x, library, f"config {config}, shape {(n, c, o, h, w)}, run {attempt}", force_config=config)


@pytest.mark.parametrize("index", range(len(RESIDUAL_SHAPES)))
def test_residual(library, index):
    # Z of Y's shape or one element, added before the activation; in split configs by the tile's last block.
    layer, x, z, config, where = residual_case(index)
    for attempt in range(2):
        check(layer, x, library, f"{where}, run {attempt}", force_config=config, z_np=z)


def test_repeated_split_launches_on_one_stream(library):
    rng = np.random.default_rng(SEED)
    layer = random_layer(512, 512, 8.0, rng)
    kernel = CudaPatternConv(layer, library)
    w, b = torch.from_numpy(layer.weights).cuda(), torch.from_numpy(layer.bias).cuda()
    xs = [torch.from_numpy(rng.standard_normal((1, 512, 7, 7)).astype(np.float32)).cuda() for _ in range(3)]
    ys = [kernel(x, w, b, force_config=511).clone() for x in xs for _ in range(5)]
    torch.cuda.synchronize()
    for i, x in enumerate(xs):
        ref32, _, unclamped = references(layer, x)
        for y in ys[5 * i: 5 * i + 5]:
            assert float((y - ref32).abs().max()) / float(unclamped.abs().max()) <= 1e-5


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("ratio", [2.25, 4.0, 8.0])
@pytest.mark.parametrize("channels,size", BENCH_LAYERS)
def test_benchmark_layers(library, channels, size, ratio, batch):
    rng = np.random.default_rng(SEED + channels + size + batch)
    layer = random_layer(channels, channels, ratio, rng)
    x = rng.standard_normal((batch, channels, size, size)).astype(np.float32)
    check(layer, x, library, f"{channels} channels, {size}x{size}, {ratio}x, batch {batch}")


def test_runs_on_the_given_stream(library):
    # A side stream that first waits on a long copy: a kernel launched elsewhere would read X before it is ready.
    rng = np.random.default_rng(SEED)
    layer = random_layer(128, 128, 8.0, rng)
    x_host = rng.standard_normal((32, 128, 28, 28)).astype(np.float32)
    x_ready = torch.from_numpy(x_host).cuda()
    w = torch.from_numpy(layer.weights).cuda()
    b = torch.from_numpy(layer.bias).cuda()
    kernel = CudaPatternConv(layer, library)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x = torch.zeros_like(x_ready)
        torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU time on this stream before the copy
        x.copy_(x_ready)
        y = kernel(x, w, b)
    stream.synchronize()
    ref32, _, unclamped = references(layer, x_ready)
    assert float((y - ref32).abs().max()) / float(unclamped.abs().max()) <= 1e-5


def test_errors_are_reported_not_crashed(library):
    rng = np.random.default_rng(SEED)
    layer = random_layer(8, 4, 4.0, rng)
    layer.kernel_channels = list(layer.kernel_channels)
    layer.kernel_channels[0] = 40
    with pytest.raises(KernelCallError, match="channel out of range"):
        CudaPatternConv(layer, library)
    layer = random_layer(8, 4, 4.0, rng, pads=(0, 0, 0, 0))
    kernel = CudaPatternConv(layer, library)
    x = torch.zeros((1, 4, 2, 2), device="cuda")
    w = torch.from_numpy(layer.weights).cuda()
    with pytest.raises(KernelCallError, match="empty"):
        kernel(x, w, None, out=torch.empty(1, device="cuda"))
    x = torch.zeros((1, 4, 5, 5), device="cuda")  # Y (1, 8, 3, 3): a Z of 2 or 71 elements is neither size
    for count in (2, 71):
        with pytest.raises(KernelCallError, match="Z is neither one element nor the output's size"):
            kernel(x, w, None, torch.zeros(count, device="cuda"))
