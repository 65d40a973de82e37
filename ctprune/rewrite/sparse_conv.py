"""Masked dense Conv / FC weight <-> SparseConv's compact blocks, and the SparseConv node (ops/SparseConv.md).

The API the rewriter uses:

    compact = compact_sparse_from_dense(weight, block=4, group=conv_group, where="Conv 'name'")   # or block=8 for FC
    model.graph.initializer.extend(compact.initializers(prefix))     # W (K, block), I (K,) uint16/int32, P (NB+1,)
    node = sparse_conv_node(compact, x, y, prefix, name=..., strides=..., pads=..., dilations=..., group=...,
                            bias=bias_name, residual=z_name, activation=Activation.relu())      # FC: geometry omitted
    model.functions.append(sparse_conv_function(opset, residual=any_node_has_z))   # once per model, like PatternConv
    # (and the ai.ctprune opset import; with residual=True every SparseConv node needs a Z: a one-element zero)

`weight` is the masked dense weight: (O, Cg, kh, kw) for a Conv, (O, I) for an FC (Gemm with transB=1, or a MatMul's
weight transposed). Blocks of `block` consecutive output channels (within one group) share one set of kept columns;
by default the mask is the weight's nonzeros and must be the same for every channel of a block (GraphError
otherwise: pass the pruning `mask=` when a kept weight may be exactly zero, or require_masked=False to store the
union of a block's nonzeros). `sparse_beats_dense` (sparse_cost.py) says whether the layer is worth converting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import onnx
from onnx import AttributeProto, helper, numpy_helper

from ctprune.errors import GraphError
from ctprune.ops.names import (
    ACTIVATION_HARDSIGMOID_MUL,
    ACTIVATION_NONE,
    ACTIVATION_SIGMOID_MUL,
    DOMAIN,
    SPARSE_BLOCKS,
    SPARSE_MIN_OPSET,
    SPARSE_OP_TYPE,
)

NARROW_COLUMNS = 1 << 16  # column spaces up to this size store their indices as uint16


@dataclass(frozen=True)
class Activation:
    """The fused activation of a SparseConv: y = c * gate(c), c = clip(conv + Z, min, max) (ops/SparseConv.md)."""

    kind: int = ACTIVATION_NONE
    min: float = float("-inf")
    max: float = float("inf")
    alpha: float = 1.0 / 6.0
    beta: float = 0.5

    @classmethod
    def none(cls) -> "Activation":
        return cls()

    @classmethod
    def relu(cls) -> "Activation":
        return cls(min=0.0)

    @classmethod
    def clip(cls, lo: float = float("-inf"), hi: float = float("inf")) -> "Activation":
        return cls(min=float(lo), max=float(hi))

    @classmethod
    def hard_swish(cls) -> "Activation":
        return cls(kind=ACTIVATION_HARDSIGMOID_MUL)

    @classmethod
    def hard_sigmoid_mul(cls, alpha: float = 0.2, beta: float = 0.5) -> "Activation":
        """x * HardSigmoid(x, alpha, beta) (ONNX HardSigmoid's defaults are 0.2, 0.5)."""
        return cls(kind=ACTIVATION_HARDSIGMOID_MUL, alpha=float(alpha), beta=float(beta))

    @classmethod
    def silu(cls) -> "Activation":
        return cls(kind=ACTIVATION_SIGMOID_MUL)

    def attributes(self) -> dict:
        return {"activation": int(self.kind), "activation_min": float(self.min), "activation_max": float(self.max),
                "activation_alpha": float(self.alpha), "activation_beta": float(self.beta)}


@dataclass(frozen=True)
class CompactSparseWeights:
    """SparseConv's compact form of one weight (ops/SparseConv.md, "Storage")."""

    values: np.ndarray  # (K, block) float32: row r = the block's weights at column columns[r]; padding lanes 0
    columns: np.ndarray  # (K,) uint16 or int32: column (c * kh + ky) * kw + kx, or the FC input feature
    pointer: np.ndarray  # (NB + 1,) int32: rows of stored position p are pointer[p]:pointer[p + 1]
    block_order: np.ndarray  # (NB,) int64: the block id at each stored position
    weight_shape: tuple[int, ...]
    block: int
    group: int = 1
    names: tuple[str, str, str] = field(default=("values", "columns", "blocks"), repr=False)

    @property
    def kept(self) -> int:
        """Kept weights (padding lanes of partial blocks not counted)."""
        sizes = np.array([size for _, _, size in _blocks(self.weight_shape, self.block, self.group)], dtype=np.int64)
        counts = np.diff(self.pointer.astype(np.int64))
        return int((counts * sizes[self.block_order]).sum()) if len(counts) else 0

    @property
    def is_fc(self) -> bool:
        return len(self.weight_shape) == 2

    def stored_bytes(self) -> int:
        # block_order is an ints attribute: varints of under 4 bytes each
        return int(self.values.nbytes + self.columns.nbytes + self.pointer.nbytes + 4 * len(self.block_order))

    def input_names(self, prefix: str) -> list[str]:
        """The initializer names `initializers(prefix)` writes: W, I, P."""
        return [f"{prefix}.{suffix}" for suffix in self.names]

    def initializers(self, prefix: str) -> list[onnx.TensorProto]:
        """W, I and P as initializers named `<prefix>.values`, `<prefix>.columns`, `<prefix>.blocks`."""
        w, i, p = self.input_names(prefix)
        return [numpy_helper.from_array(np.ascontiguousarray(self.values, dtype=np.float32), w),
                numpy_helper.from_array(np.ascontiguousarray(self.columns), i),
                numpy_helper.from_array(np.ascontiguousarray(self.pointer, dtype=np.int32), p)]

    def attributes(self) -> dict:
        """weight_shape, block, block_order (and group for a Conv): ready for onnx.helper.make_attribute."""
        attrs = {"weight_shape": [int(d) for d in self.weight_shape], "block": int(self.block),
                 "block_order": [int(b) for b in self.block_order]}
        if not self.is_fc:
            attrs["group"] = int(self.group)
        return attrs

    def dense(self) -> np.ndarray:
        """The dense float32 weight (weight_shape) this form stands for."""
        dense = np.zeros((self.weight_shape[0], int(np.prod(self.weight_shape[1:]))), dtype=np.float32)
        blocks = _blocks(self.weight_shape, self.block, self.group)
        columns = self.columns.astype(np.int64)
        for position, block_id in enumerate(self.block_order):
            _, first, size = blocks[int(block_id)]
            rows = slice(int(self.pointer[position]), int(self.pointer[position + 1]))
            # columns index the group's own (Cg, kh, kw) space, which is also the dense weight's second axis
            dense[first : first + size, columns[rows]] = self.values[rows, :size].T
        return dense.reshape(self.weight_shape)


def _blocks(weight_shape: Sequence[int], block: int, group: int) -> list[tuple[int, int, int]]:
    """(group, first output channel, channels) of every block, in block-id order."""
    per_group = int(weight_shape[0]) // group
    return [(g, g * per_group + first, min(block, per_group - first))
            for g in range(group) for first in range(0, per_group, block)]


def _first_outside(flat: np.ndarray, kept: np.ndarray, rows: int = 256) -> tuple[int, int] | None:
    """(output channel, column) of the first nonzero weight outside `kept`, or None. Row chunks: a 100M-weight FC
    layer gets no whole-weight temporaries."""
    for start in range(0, flat.shape[0], rows):
        bad = (flat[start:start + rows] != 0) & ~kept[start:start + rows]
        if bad.any():
            o, c = (int(v[0]) for v in np.nonzero(bad))
            return start + o, c
    return None


def compact_sparse_from_dense(
    weight: np.ndarray,
    block: int,
    require_masked: bool = True,
    *,
    group: int = 1,
    mask: Optional[np.ndarray] = None,
    order_by_work: bool = True,
    where: str = "layer",
) -> CompactSparseWeights:
    """Compact a masked dense weight ((O, Cg, kh, kw) Conv or (O, I) FC) into blocks of `block` output channels.

    mask: the kept positions (bool, weight's shape); default the weight's nonzeros. Each block keeps the columns its
    channels keep; the mask must be the same for every channel of a block and the weight zero outside it, else
    GraphError, unless require_masked=False (then a block keeps the union of its channels' columns and weights
    outside `mask` are dropped only where no channel of the block keeps that column).
    order_by_work: store blocks by decreasing kept columns (ties: lower block id), so threads that take consecutive
    blocks get similar work; False keeps block-id order."""
    weight = np.asarray(weight)
    if weight.ndim not in (2, 4):
        raise GraphError(f"{where}: SparseConv needs a (O, Cg, kh, kw) or (O, I) weight, got shape {weight.shape}")
    if not np.issubdtype(weight.dtype, np.floating):
        raise GraphError(f"{where}: the weight must be floating point, got {weight.dtype}")
    if int(block) not in SPARSE_BLOCKS:
        raise GraphError(f"{where}: block must be one of {SPARSE_BLOCKS}, got {block}")
    block = int(block)
    O = weight.shape[0]
    if group < 1 or O % group or (weight.ndim == 2 and group != 1):
        raise GraphError(f"{where}: group {group} does not divide the {O} output channels (an FC has group 1)")
    flat = weight.reshape(O, -1)
    columns_per_group = flat.shape[1]
    kept = (flat != 0) if mask is None else np.asarray(mask, dtype=bool).reshape(flat.shape)
    if mask is not None and np.asarray(mask).size != flat.size:
        raise GraphError(f"{where}: the mask has {np.asarray(mask).size} elements, the weight {flat.size}")
    outside = _first_outside(flat, kept) if mask is not None and require_masked else None
    if outside is not None:
        o, c = outside
        raise GraphError(f"{where}: the weight is nonzero outside the mask (first: output channel {o}, column {c})")

    blocks = _blocks(weight.shape, block, group)
    per_block_columns, counts = [], []
    for block_id, (_, first, size) in enumerate(blocks):
        rows = kept[first : first + size]
        union = rows.any(axis=0)
        if require_masked and size > 1 and not (rows == union).all():
            lane, column = (int(v[0]) for v in np.nonzero(rows != union))
            raise GraphError(
                f"{where}: output channels {first}..{first + size - 1} form one SparseConv block of {block} but do "
                f"not keep the same weights (channel {first + lane}, column {column}); prune in blocks of {block} "
                "output channels, pass mask= when a kept weight is exactly zero, or require_masked=False"
            )
        cols = np.nonzero(union)[0]
        per_block_columns.append(cols)
        counts.append(len(cols))
    counts = np.array(counts, dtype=np.int64)
    ids = np.arange(len(blocks))
    order = np.lexsort((ids, -counts)) if order_by_work else ids

    index_type = np.uint16 if columns_per_group <= NARROW_COLUMNS else np.int32
    total = int(counts.sum())
    values = np.zeros((total, block), dtype=np.float32)
    columns = np.zeros(total, dtype=index_type)
    pointer = np.zeros(len(blocks) + 1, dtype=np.int64)
    row = 0
    for position, block_id in enumerate(order):
        _, first, size = blocks[block_id]
        cols = per_block_columns[block_id]
        values[row : row + len(cols), :size] = flat[first : first + size, cols].T
        columns[row : row + len(cols)] = cols
        row += len(cols)
        pointer[position + 1] = row
    if total >= 2**31:
        raise GraphError(f"{where}: {total} kept columns do not fit SparseConv's int32 block pointers")
    return CompactSparseWeights(values=values, columns=columns, pointer=pointer.astype(np.int32),
                                block_order=order.astype(np.int64), weight_shape=tuple(int(d) for d in weight.shape),
                                block=block, group=int(group))


def sparse_conv_node(
    compact: CompactSparseWeights,
    x: str,
    output: str,
    prefix: str,
    *,
    name: str = "",
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
    bias: str = "",
    residual: str = "",
    activation: Activation = Activation(),
) -> onnx.NodeProto:
    """The SparseConv node reading X=`x`, the initializers `compact.initializers(prefix)` names, the optional bias and
    residual Z, and writing `output`. A Conv's group is the compact form's; an FC node carries no Conv geometry."""
    node = onnx.NodeProto()
    node.op_type, node.domain, node.name = SPARSE_OP_TYPE, DOMAIN, name
    inputs = [x] + compact.input_names(prefix) + [bias or ""] + ([residual] if residual else [])
    while inputs[-1] == "":
        inputs.pop()
    node.input.extend(inputs)
    node.output.append(output)
    ints = dict(compact.attributes())
    if not compact.is_fc:
        ints.update(strides=[int(s) for s in strides], pads=[int(p) for p in pads],
                    dilations=[int(d) for d in dilations])
    elif tuple(strides) != (1, 1) or tuple(pads) != (0, 0, 0, 0) or tuple(dilations) != (1, 1):
        raise GraphError(f"SparseConv {name!r}: an FC node has no strides, pads or dilations")
    for key, value in ints.items():
        kind = AttributeProto.INTS if isinstance(value, list) else AttributeProto.INT
        node.attribute.append(helper.make_attribute(key, value, attr_type=kind))
    act = activation.attributes()
    node.attribute.append(helper.make_attribute("activation", act.pop("activation")))
    for key, value in act.items():
        node.attribute.append(helper.make_attribute(key, float(value), attr_type=AttributeProto.FLOAT))
    return node


def sparse_conv_function(opset: int = SPARSE_MIN_OPSET, residual: bool = False) -> onnx.FunctionProto:
    """The model-local FunctionProto for SparseConv (see ctprune.ops.sparse_reference.sparse_conv_function)."""
    from ctprune.ops.sparse_reference import sparse_conv_function as make

    return make(opset, residual=residual)
