"""Drive the SparseConv GPU kernels without onnxruntime: build them, call them through their C ABI, make test layers.

The same two builds as PatternConv's (ctprune.lab.cuda_harness), through ctprune.lab.cuda_library:
- ``build_sparse_cuda_kernel``: nvcc compiles ``sparse_conv_impl.cu`` into a small shared library (running it needs a
  GPU); ``CudaSparseConv`` calls it on torch CUDA tensors, on torch's current stream.
- ``build_sparse_emulator``: g++ compiles ``sparse_conv_emulate.cc``, which runs the kernels' own thread steps on the
  CPU with guard zones (``EmulatedSparseConv``), so their indexing is tested on machines without a GPU.

``random_sparse_layer`` draws a block-pruned Conv or FC layer the way the CPU tests do (ctprune.lab.layer_model), in
SparseConv's compact form (ctprune.rewrite.sparse_conv); ``reference`` is numpy's float64 SparseConv on its dense weight.
"""

from __future__ import annotations

import ctypes
import math
import pathlib
from dataclasses import dataclass, field

import numpy as np

from ctprune.lab.cuda_harness import _sources
from ctprune.lab.cuda_library import CSRC, Emulator, PreparedCudaKernel, build_cuda_library, build_emulator_library

__all__ = [
    "SparseLayer",
    "random_sparse_layer",
    "reference",
    "build_sparse_emulator",
    "build_sparse_cuda_kernel",
    "EmulatedSparseConv",
    "CudaSparseConv",
    "SPARSE_SPEC_SOURCES",
]

SPARSE_SPEC_SOURCES = ("ops/op_spec.cc", "ops/sparse_conv_spec.cc")


@dataclass
class SparseLayer:
    """One SparseConv node: its compact weights (CompactSparseWeights), bias, geometry and fused activation."""

    compact: object
    bias: np.ndarray | None = None  # (O,) float32
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)
    activation_min: float = -math.inf
    activation_max: float = math.inf
    activation: int = 0  # 0 none, 1 c * HardSigmoid(c), 2 c * Sigmoid(c)
    alpha: float = 1.0 / 6.0
    beta: float = 0.5
    _keep: list = field(default_factory=list, repr=False)

    @property
    def fc(self) -> bool:
        return len(self.compact.weight_shape) == 2

    @property
    def weights(self) -> np.ndarray:
        return np.ascontiguousarray(self.compact.values, dtype=np.float32)

    def input_channels(self) -> int:
        shape = self.compact.weight_shape
        return int(shape[1]) if self.fc else int(shape[1]) * int(self.compact.group)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        if self.fc:
            return 1, 1
        _, _, kh, kw = self.compact.weight_shape
        top, left, bottom, right = self.pads
        return ((h + top + bottom - self.dilations[0] * (kh - 1) - 1) // self.strides[0] + 1,
                (w + left + right - self.dilations[1] * (kw - 1) - 1) // self.strides[1] + 1)

    def desc(self) -> "_Desc":
        """The C struct for the kernel library (keeps its arrays alive on self)."""
        c = self.compact
        arrays = [np.ascontiguousarray(np.asarray(a, dtype=np.int64).reshape(-1))
                  for a in (c.block_order, c.pointer, c.columns)]
        self._keep = arrays
        ptr = [a.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)) for a in arrays]
        shape = list(c.weight_shape) + ([1, 1] if self.fc else [])
        return _Desc(int(self.fc), *[int(v) for v in shape], int(c.block), int(c.group), ptr[0], len(arrays[0]),
                     ptr[1], ptr[2], len(arrays[2]), *self.strides, *self.pads, *self.dilations,
                     self.activation_min, self.activation_max, int(self.activation), self.alpha, self.beta)


class _Desc(ctypes.Structure):
    _fields_ = [
        ("fc", ctypes.c_int64), ("out_channels", ctypes.c_int64), ("group_channels", ctypes.c_int64),
        ("kernel_h", ctypes.c_int64), ("kernel_w", ctypes.c_int64), ("block", ctypes.c_int64),
        ("group", ctypes.c_int64), ("block_order", ctypes.POINTER(ctypes.c_int64)), ("num_blocks", ctypes.c_int64),
        ("pointer", ctypes.POINTER(ctypes.c_int64)), ("columns", ctypes.POINTER(ctypes.c_int64)),
        ("num_rows", ctypes.c_int64),
        ("stride_h", ctypes.c_int64), ("stride_w", ctypes.c_int64), ("pad_top", ctypes.c_int64),
        ("pad_left", ctypes.c_int64), ("pad_bottom", ctypes.c_int64), ("pad_right", ctypes.c_int64),
        ("dilation_h", ctypes.c_int64), ("dilation_w", ctypes.c_int64),
        ("activation_min", ctypes.c_float), ("activation_max", ctypes.c_float), ("activation", ctypes.c_int64),
        ("activation_alpha", ctypes.c_float), ("activation_beta", ctypes.c_float),
    ]


def random_sparse_layer(rng: np.random.Generator, weight_shape, ratio: float, block: int, *, group: int = 1,
                        bias: bool = True, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
                        activation=(-math.inf, math.inf), gate: int = 0, empty_blocks: int = 0) -> SparseLayer:
    """A layer keeping 1/ratio of its weights in blocks of `block` output channels (a Conv's weight_shape
    (O, Cg, kh, kw) with `group`, or an FC's (O, I)), drawn as the CPU tests draw theirs."""
    from ctprune.lab.layer_model import masked_random_weight, random_block_mask
    from ctprune.rewrite.sparse_conv import compact_sparse_from_dense

    mask = random_block_mask(rng, weight_shape, 1.0 / ratio, block, group, empty_blocks)
    compact = compact_sparse_from_dense(masked_random_weight(rng, mask), block, group=group, mask=mask)
    b = rng.standard_normal(int(weight_shape[0])).astype(np.float32) if bias else None
    return SparseLayer(compact, b, tuple(strides), tuple(pads), tuple(dilations), float(activation[0]),
                       float(activation[1]), int(gate))


def reference(layer: SparseLayer, x: np.ndarray, z: np.ndarray | None = None, w: np.ndarray | None = None):
    """numpy's float64 SparseConv (ops/sparse_reference.py) on the layer's dense weight (or on `w`'s values)."""
    from ctprune.ops.sparse_reference import dense_weight_from_sparse, sparse_conv_numpy

    c = layer.compact
    dense = dense_weight_from_sparse(c.values if w is None else w, c.columns, c.pointer, c.weight_shape, c.block,
                                     c.block_order, c.group)
    with np.errstate(invalid="ignore", over="ignore"):
        return sparse_conv_numpy(x, dense, layer.bias, layer.strides, layer.pads, layer.dilations, c.group,
                                 layer.activation_min, layer.activation_max, layer.activation, layer.alpha,
                                 layer.beta, Z=z)


def _sparse_sources():
    return _sources() + [CSRC / name for name in SPARSE_SPEC_SOURCES] + [CSRC / "ops" / "sparse_conv_spec.h"]


def build_sparse_emulator(build_dir: pathlib.Path | None = None) -> pathlib.Path:
    """g++ build of the CPU emulation of the SparseConv GPU kernels; cached by source digest."""
    return build_emulator_library("sparse_conv", SPARSE_SPEC_SOURCES, _sparse_sources(), build_dir)


def build_sparse_cuda_kernel(build_dir: pathlib.Path | None = None, arch: str | None = None) -> pathlib.Path:
    """nvcc build of the SparseConv GPU kernels as a standalone library; arch like 'sm_90' (default: this GPU's)."""
    return build_cuda_library("sparse_conv", SPARSE_SPEC_SOURCES, _sparse_sources(), build_dir, arch)


def _shape_args(layer: SparseLayer, shape) -> tuple[int, int, int, int]:
    if layer.fc:
        return int(shape[0]), int(shape[1]), 1, 1
    return tuple(int(v) for v in shape)


class EmulatedSparseConv:
    """The SparseConv GPU kernels' code run on the CPU (numpy in, numpy out)."""

    def __init__(self, library: pathlib.Path | None = None):
        self.emulator = Emulator(library or build_sparse_emulator(), "SparseConv", "ctprune_sparse_conv", _Desc, 4)
        self.lib = self.emulator.lib

    def __call__(self, layer: SparseLayer, x: np.ndarray, z: np.ndarray | None = None,
                 w: np.ndarray | None = None) -> np.ndarray:
        """z: the residual (one element or the output's shape) or None; w: other (K, block) values than the layer's."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        z = None if z is None else np.ascontiguousarray(z, dtype=np.float32)
        wts = np.ascontiguousarray(layer.weights if w is None else w, dtype=np.float32)
        bias = None if layer.bias is None else np.ascontiguousarray(layer.bias, dtype=np.float32)
        n, c, h, wd = _shape_args(layer, x.shape)
        oh, ow = layer.output_size(h, wd)
        o = int(layer.compact.weight_shape[0])
        y = np.full((n, o) if layer.fc else (n, o, max(oh, 0), max(ow, 0)), np.nan, dtype=np.float32)
        self.emulator.run(layer, x, wts, bias, z, y, n, c, h, wd)
        return y


class CudaSparseConv(PreparedCudaKernel):
    """The SparseConv GPU kernels for one layer, prepared on the current CUDA device; call on torch CUDA tensors."""

    OP, PREFIX, DESC = "SparseConv", "ctprune_sparse_conv", _Desc
    SHAPE_ARGS = 4  # n, c, h, w (an FC's x (N, I) as (N, I, 1, 1))
    build_library = staticmethod(build_sparse_cuda_kernel)

    def __call__(self, x, w, b=None, z=None, *, out=None):
        """x (N, C, H, W) or (N, I), w (K, block), b (O,) or None, z (one element or y's shape) or None: contiguous
        float32 torch CUDA tensors. Runs on the current stream and returns y."""
        import torch

        self.check_tensors(x=x, w=w, b=b, z=z, out=out)
        n, c, h, wd = _shape_args(self.layer, x.shape)
        oh, ow = self.layer.output_size(h, wd)
        o = int(self.layer.compact.weight_shape[0])
        if out is None:
            out = torch.empty((n, o) if self.layer.fc else (n, o, oh, ow), device=x.device, dtype=torch.float32)
        return self.launch(x, w, b, z, out, (n, c, h, wd))
