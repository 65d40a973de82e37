"""Drive the PatternConv GPU kernel without onnxruntime: build it, call it through its C ABI, and make test layers.

Two builds of the same kernel code (csrc/cuda/), through ctprune.lab.cuda_library as SparseConv's:
- ``build_cuda_kernel``: nvcc compiles ``pattern_conv_impl.cu`` into a small shared library (needs the CUDA toolkit;
  running it needs a GPU). ``CudaPatternConv`` calls it on torch CUDA tensors, on torch's current stream.
- ``build_emulator``: g++ compiles ``pattern_conv_emulate.cc``, which runs the kernel's own block/thread steps on the
  CPU with guard zones, so the kernel's indexing is tested on machines without a GPU (``EmulatedPatternConv``).

``layer_from_compact`` / ``random_layer`` make a pruned layer in the operator's storage order (ops/PatternConv.md)
and ``dense_weight`` rebuilds the masked dense weight it stands for, the reference for every check.
"""

from __future__ import annotations

import ctypes
import math
import pathlib
from dataclasses import dataclass, field

import numpy as np

from ctprune.lab.cuda_library import (CSRC, INVALID_SHAPE, Emulator, KernelCallError, PreparedCudaKernel,
                                      build_cuda_library, build_emulator_library, cuda_sources)

__all__ = [
    "CSRC",
    "PatternConvLayer",
    "layer_from_compact",
    "random_layer",
    "dense_weight",
    "build_emulator",
    "build_cuda_kernel",
    "EmulatedPatternConv",
    "CudaPatternConv",
    "KernelCallError",
    "INVALID_SHAPE",
    "KERNEL_CONFIGS",
    "SPLIT_CONFIGS",
]

KERNEL_CONFIGS = (11, 12, 14, 21, 22, 24, 41, 42, 44)  # 10 * filters per thread + pixels per thread
SPLIT_CONFIGS = (211, 344, 811, 524)  # 100 * channel splits + the above


@dataclass
class PatternConvLayer:
    """One PatternConv node's attributes and compact weights, in the operator's storage order."""

    weight_shape: tuple[int, int, int, int]
    patterns: list[int]
    kernel_filters: list[int]
    kernel_channels: list[int]
    kernel_patterns: list[int]
    weights: np.ndarray  # (K, 4) float32
    bias: np.ndarray | None = None  # (O,) float32
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (1, 1, 1, 1)
    activation_min: float = -math.inf
    activation_max: float = math.inf
    _keep: list = field(default_factory=list, repr=False)

    def desc(self) -> "_Desc":
        """The C struct for the kernel library (keeps its arrays alive on self)."""
        arrays = [np.ascontiguousarray(np.asarray(a, dtype=np.int64).reshape(-1)) for a in
                  (self.patterns, self.kernel_filters, self.kernel_channels, self.kernel_patterns)]
        self._keep = arrays
        ptr = [a.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)) for a in arrays]
        return _Desc(
            self.weight_shape[0], self.weight_shape[1], ptr[0], len(self.patterns) // 4, ptr[1], ptr[2], ptr[3],
            len(self.kernel_filters), self.strides[0], self.strides[1], *self.pads,
            self.activation_min, self.activation_max,
        )

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        top, left, bottom, right = self.pads
        return (h + top + bottom - 3) // self.strides[0] + 1, (w + left + right - 3) // self.strides[1] + 1


class _Desc(ctypes.Structure):
    _fields_ = [
        ("out_channels", ctypes.c_int64), ("in_channels", ctypes.c_int64),
        ("patterns", ctypes.POINTER(ctypes.c_int64)), ("num_patterns", ctypes.c_int64),
        ("kernel_filters", ctypes.POINTER(ctypes.c_int64)), ("kernel_channels", ctypes.POINTER(ctypes.c_int64)),
        ("kernel_patterns", ctypes.POINTER(ctypes.c_int64)), ("num_kernels", ctypes.c_int64),
        ("stride_h", ctypes.c_int64), ("stride_w", ctypes.c_int64),
        ("pad_top", ctypes.c_int64), ("pad_left", ctypes.c_int64),
        ("pad_bottom", ctypes.c_int64), ("pad_right", ctypes.c_int64),
        ("activation_min", ctypes.c_float), ("activation_max", ctypes.c_float),
    ]


def layer_from_compact(compact, bias=None, strides=(1, 1), pads=(0, 0, 0, 0),
                       activation=(-math.inf, math.inf)) -> PatternConvLayer:
    """A layer from ctprune.rewrite.pattern_conv.CompactPatternWeights (already in the operator's storage order)."""
    return PatternConvLayer(
        tuple(int(v) for v in compact.weight_shape), [int(v) for v in np.asarray(compact.patterns).ravel()],
        [int(v) for v in compact.kernel_filters], [int(v) for v in compact.kernel_channels],
        [int(v) for v in compact.kernel_patterns], np.ascontiguousarray(compact.weights, dtype=np.float32).reshape(-1, 4),
        None if bias is None else np.ascontiguousarray(bias, dtype=np.float32), tuple(int(v) for v in strides),
        tuple(int(v) for v in pads), float(activation[0]), float(activation[1]))


def random_layer(out_channels: int, in_channels: int, ratio: float, rng: np.random.Generator, *, library: int = 8,
                 bias: bool = True, strides=(1, 1), pads=(1, 1, 1, 1), activation=(-math.inf, math.inf),
                 empty_filters: int = 0) -> PatternConvLayer:
    """A layer compressed `ratio` times against the dense 3x3 weight (4-of-9 patterns give 2.25x; beyond that whole
    kernels go), drawn as the CPU tests draw theirs (ctprune.lab.layer_model)."""
    from ctprune.lab.layer_model import masked_weight, random_layer_patterns
    from ctprune.rewrite.pattern_conv import compact_from_dense

    patterns = random_layer_patterns(rng, out_channels, in_channels, min(1.0, 2.25 / ratio), library, empty_filters)
    weight = masked_weight(rng, patterns)
    b = rng.standard_normal(out_channels).astype(np.float32) if bias else None
    return layer_from_compact(compact_from_dense(weight, patterns), b, strides, pads, activation)


def dense_weight(layer: PatternConvLayer) -> np.ndarray:
    """The masked dense (O, C, 3, 3) weight the layer stands for."""
    dense = np.zeros(layer.weight_shape, dtype=np.float32).reshape(layer.weight_shape[0], layer.weight_shape[1], 9)
    for k, (f, c, p) in enumerate(zip(layer.kernel_filters, layer.kernel_channels, layer.kernel_patterns)):
        dense[f, c, layer.patterns[4 * p: 4 * p + 4]] = layer.weights[k]
    return dense.reshape(layer.weight_shape)


# The spec checks every build of a GPU kernel links (ops/op_spec.h: free of onnxruntime).
SPEC_SOURCES = ("ops/op_spec.cc", "ops/pattern_conv_spec.cc")


def _sources():
    return cuda_sources(SPEC_SOURCES)


def build_emulator(build_dir: pathlib.Path | None = None) -> pathlib.Path:
    """g++ build of the CPU emulation of the GPU kernel; cached by source digest."""
    return build_emulator_library("pattern_conv", SPEC_SOURCES, _sources(), build_dir)


def build_cuda_kernel(build_dir: pathlib.Path | None = None, arch: str | None = None) -> pathlib.Path:
    """nvcc build of the GPU kernel as a standalone library; arch like 'sm_90' (default: the current GPU's)."""
    return build_cuda_library("pattern_conv", SPEC_SOURCES, _sources(), build_dir, arch)


class EmulatedPatternConv:
    """The GPU kernel's code run on the CPU (numpy in, numpy out)."""

    def __init__(self, library: pathlib.Path | None = None):
        # after the input's shape: the SM count and config the plan is made for, and the plan written back
        self.emulator = Emulator(library or build_emulator(), "PatternConv", "ctprune_pattern_conv", _Desc, 3,
                                 [ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)])
        self.lib = self.emulator.lib
        self.lib.ctprune_fastdivmod_selftest.restype = ctypes.c_int64
        self.lib.ctprune_fastdivmod_selftest.argtypes = [ctypes.c_uint32, ctypes.c_int64]

    def __call__(self, layer: PatternConvLayer, x: np.ndarray, z: np.ndarray | None = None, *, force_config: int = 0,
                 num_sms: int = 132):
        """z: the residual (one element or the output's shape), or None. Returns (y, plan) with
        plan = dict(ft, px, nimg, TR, TC, CC, blocks, splits)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        z = None if z is None else np.ascontiguousarray(z, dtype=np.float32)
        n, _, h, w = x.shape
        oh, ow = layer.output_size(h, w)
        y = np.full((n, layer.weight_shape[0], max(oh, 0), max(ow, 0)), np.nan, dtype=np.float32)
        wts = np.ascontiguousarray(layer.weights, dtype=np.float32)
        bias = None if layer.bias is None else np.ascontiguousarray(layer.bias, dtype=np.float32)
        plan = (ctypes.c_int64 * 8)()
        self.emulator.run(layer, x, wts, bias, z, y, n, h, w, num_sms, force_config, plan)
        return y, dict(zip(("ft", "px", "nimg", "TR", "TC", "CC", "blocks", "splits"), list(plan)))

    def divmod_mismatches(self, seed: int = 0, trials: int = 200_000) -> int:
        return int(self.lib.ctprune_fastdivmod_selftest(seed, trials))


class CudaPatternConv(PreparedCudaKernel):
    """The GPU kernel for one layer, prepared on the current CUDA device; call it on torch CUDA tensors."""

    OP, PREFIX, DESC = "PatternConv", "ctprune_pattern_conv", _Desc
    SHAPE_ARGS = 3  # n, h, w
    EXTRA_ARGTYPES = (ctypes.c_int,)  # force_config
    build_library = staticmethod(build_cuda_kernel)

    def __call__(self, x, w, b=None, z=None, *, out=None, force_config: int = 0):
        """x (N, C, H, W), w (K, 4), b (O,) or None, z (the residual: one element or y's shape) or None: contiguous
        float32 torch CUDA tensors. Runs on the current stream and returns y (N, O, OH, OW)."""
        import torch

        self.check_tensors(x=x, w=w, b=b, z=z, out=out)
        n, _, h, wd = x.shape
        oh, ow = self.layer.output_size(h, wd)
        if out is None:
            out = torch.empty((n, self.layer.weight_shape[0], oh, ow), device=x.device, dtype=torch.float32)
        return self.launch(x, w, b, z, out, (n, h, wd), (force_config,))
