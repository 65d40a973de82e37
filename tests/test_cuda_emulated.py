"""The PatternConv GPU kernel's own code, run on the CPU (csrc/cuda/pattern_conv_emulate.cc), against torch's conv2d.

Machines without a GPU still check the GPU kernel's indexing this way: the emulator runs the kernel's block and
thread steps exactly as the CUDA kernel composes them, refilling shared memory with NaN before every chunk and
framing every buffer with NaN guard zones, so a read of an unstaged or out-of-range element shows as NaN and a write
outside the output fails the call. Cases: the CPU kernel's randomized matrix (tests/test_patternconv_matrix.py),
every tile configuration forced on odd shapes, the benchmark's layer shapes, and a fused residual Z."""

import shutil

import numpy as np
import pytest
import torch

from ctprune.lab.cuda_harness import (INVALID_SHAPE, KERNEL_CONFIGS, SPLIT_CONFIGS, EmulatedPatternConv, KernelCallError,
                                  dense_weight, random_layer)

from cuda_cases import RESIDUAL_SHAPES, matrix_case, odd_tile_cases, residual_case
from test_patternconv_matrix import CASES, SEED, _ids

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def emulator():
    return EmulatedPatternConv()


def reference(layer, x: np.ndarray, z: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """float64 torch conv2d on the masked dense weight, plus the residual z: (clamped by the fused activation, before
    the clamp)."""
    top, left, bottom, right = layer.pads
    xp = torch.nn.functional.pad(torch.from_numpy(x).double(), (left, right, top, bottom))
    b = None if layer.bias is None else torch.from_numpy(layer.bias).double()
    y = torch.nn.functional.conv2d(xp, torch.from_numpy(dense_weight(layer)).double(), b, stride=layer.strides)
    if z is not None:
        y = y + torch.from_numpy(z).double()  # one element broadcasts
    return y.clamp(layer.activation_min, layer.activation_max).numpy(), y.numpy()


def rel_err(a, b, scale) -> float:
    """max|a - b| / max|scale|: the project's measure, scaled by the pre-activation output (the float32 sums' size;
    a clamp to (-0.3, 0.4) must not turn the same rounding into a larger relative error)."""
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(scale).max(), 1e-30))


def check(emulator, layer, x, where, z=None, **kw):
    y, plan = emulator(layer, x, z, **kw)
    ref, unclamped = reference(layer, x, z)
    assert y.shape == ref.shape, where
    assert not np.isnan(y).any(), f"{int(np.isnan(y).sum())} outputs unwritten or read from unstaged memory: {where}, plan {plan}"
    err = rel_err(y, ref, unclamped)
    assert err <= 1e-5, f"rel err {err:.2e}: {where}, plan {plan}"
    return plan


def test_fast_division_is_exact(emulator):
    assert emulator.divmod_mismatches(seed=SEED % 2**32, trials=300_000) == 0


@pytest.mark.parametrize("index", range(len(CASES)), ids=_ids(CASES))
def test_matrix_case(emulator, index):
    check(emulator, *matrix_case(index))


@pytest.mark.parametrize("config", KERNEL_CONFIGS)
def test_every_tile_config(emulator, config):
    for layer, x, where in odd_tile_cases(config):
        plan = check(emulator, layer, x, where, force_config=config)
        assert plan["ft"] * 10 + plan["px"] == config


@pytest.mark.parametrize("config", SPLIT_CONFIGS)
def test_channel_splits(emulator, config):
    # Splits that do not divide C, splits with fewer channels than a chunk, and one with more splits than channels
    # (empty splits are dropped); every output tile's partial sums are reduced once, and tickets end at zero.
    rng = np.random.default_rng(SEED + config)
    for n, c, o, h, w in [(1, 70, 40, 7, 7), (2, 13, 9, 5, 11), (1, 3, 17, 4, 4), (3, 100, 33, 2, 9)]:
        layer = random_layer(o, c, 8.0, rng, activation=(0.0, 6.0), empty_filters=o // 6)
        x = rng.standard_normal((n, c, h, w)).astype(np.float32)
        plan = check(emulator, layer, x, f"config {config}, shape {(n, c, o, h, w)}", force_config=config)
        wanted = config // 100
        assert plan["splits"] == -(-c // -(-c // wanted)), plan  # ceil(C / ceil(C / wanted))


@pytest.mark.parametrize("index", range(len(RESIDUAL_SHAPES)))
def test_residual(emulator, index):
    # Z of Y's shape or one element, added before the activation; in split configs by the tile's last block.
    layer, x, z, config, where = residual_case(index)
    plan = check(emulator, layer, x, where, z, force_config=config)
    if config > 100:
        c, wanted = x.shape[1], config // 100
        assert plan["splits"] == -(-c // -(-c // wanted)) > 1, plan


def test_residual_of_the_wrong_size_is_refused(emulator):
    rng = np.random.default_rng(SEED)
    layer = random_layer(8, 4, 4.0, rng)
    x = rng.standard_normal((2, 4, 5, 6)).astype(np.float32)
    y_size = 2 * 8 * 5 * 6
    for count in (0, 2, y_size - 1, y_size + 1):
        with pytest.raises(KernelCallError, match=f"status {INVALID_SHAPE}"):
            emulator(layer, x, np.zeros(count, np.float32))
    for z in (np.full((1, 1, 1, 1), 0.5, np.float32), np.zeros((2, 8, 5, 6), np.float32)):  # the two accepted sizes
        check(emulator, layer, x, f"Z shape {z.shape}", z)


def test_planner_splits_channels_of_deep_layers_at_batch_1(emulator):
    rng = np.random.default_rng(SEED)
    layer = random_layer(512, 512, 8.0, rng)
    x = rng.standard_normal((1, 512, 7, 7)).astype(np.float32)
    plan = check(emulator, layer, x, "512 channels, 7x7, batch 1")
    assert plan["splits"] > 1 and plan["blocks"] >= 264, plan
    wide = random_layer(64, 64, 8.0, rng)
    _, plan = emulator(wide, rng.standard_normal((4, 64, 56, 56)).astype(np.float32))
    assert plan["splits"] == 1, plan


@pytest.mark.parametrize("channels,size", [(64, 56), (128, 28), (256, 14)])  # 512 x 4 and 511 x 7 are in the matrix
def test_benchmark_layers_at_8x(emulator, channels, size):
    rng = np.random.default_rng(SEED + channels + size)
    layer = random_layer(channels, channels, 8.0, rng)
    x = rng.standard_normal((1, channels, size, size)).astype(np.float32)
    check(emulator, layer, x, f"{channels} channels, {size}x{size}")


def test_planner_prefers_work_per_thread_when_the_grid_is_full(emulator):
    rng = np.random.default_rng(SEED)
    layer = random_layer(64, 16, 8.0, rng)
    big = rng.standard_normal((32, 16, 32, 32)).astype(np.float32)
    _, plan = emulator(layer, big)
    assert (plan["ft"], plan["px"]) == (4, 4) and plan["blocks"] >= 264
    small = rng.standard_normal((1, 16, 4, 4)).astype(np.float32)
    _, plan = emulator(layer, small)
    assert (plan["ft"], plan["px"]) == (1, 1)


def test_invalid_attributes_are_named(emulator):
    rng = np.random.default_rng(SEED)
    layer = random_layer(8, 4, 4.0, rng)
    layer.kernel_patterns = list(layer.kernel_patterns)
    layer.kernel_patterns[0] = 99
    x = rng.standard_normal((1, 4, 5, 5)).astype(np.float32)
    with pytest.raises(KernelCallError, match="pattern id out of range"):
        emulator(layer, x)
    layer = random_layer(8, 4, 4.0, rng)
    layer.kernel_filters = list(reversed(layer.kernel_filters))
    with pytest.raises(KernelCallError, match="invalid PatternConv attributes"):
        emulator(layer, x)


def test_no_kernel_left_and_no_pattern_gives_bias_then_activation(emulator):
    from ctprune.lab.cuda_harness import PatternConvLayer

    rng = np.random.default_rng(SEED)
    bias = rng.standard_normal(11).astype(np.float32)
    layer = PatternConvLayer((11, 3, 3, 3), [], [], [], [], np.zeros((0, 4), np.float32), bias, (1, 1), (1, 1, 1, 1),
                             -0.5, 0.5)
    x = rng.standard_normal((2, 3, 5, 6)).astype(np.float32)
    y, _ = emulator(layer, x)
    np.testing.assert_array_equal(y, np.broadcast_to(np.clip(bias, -0.5, 0.5)[None, :, None, None], y.shape))
