"""One-layer models for tests and per-layer benchmarks: a PatternConv node and the dense Conv it stands for.

`random_layer_patterns` draws a layer's pruning the way ClickTrain leaves it (a library of distinct 4-of-9 patterns,
a fraction of whole kernels removed); `pattern_conv_layer_model` / `dense_conv_layer_model` wrap one layer in a model
that onnxruntime runs, with or without ctprune's library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ctprune.ops import pattern_layout
from ctprune.ops.names import ALL_PATTERNS as SPEC_PATTERNS
from ctprune.ops.names import DOMAIN, VERSION
from ctprune.ops.reference import pattern_conv_function
from ctprune.rewrite.upgrade import MIN_IR_VERSION
from ctprune.rewrite.pattern_conv import CompactPatternWeights, LayerPatterns, compact_from_dense

ALL_PATTERNS = np.array(SPEC_PATTERNS, dtype=np.int64)  # the 126 4-of-9 shapes (ops/names.py)


def random_layer_patterns(
    rng: np.random.Generator,
    out_channels: int,
    in_channels: int,
    kept_fraction: float = 1.0,
    library_size: int = 8,
    empty_filters: int = 0,
) -> LayerPatterns:
    """A library of `library_size` distinct random patterns, each kernel assigned one, round(kept_fraction * O * C)
    kernels kept (at random, outside `empty_filters` filters that keep none). Every pattern is used when there are
    at least as many kept kernels as patterns."""
    library = ALL_PATTERNS[rng.choice(len(ALL_PATTERNS), size=library_size, replace=False)]
    empty = rng.choice(out_channels, size=min(empty_filters, out_channels), replace=False)
    eligible = np.setdiff1d(np.arange(out_channels * in_channels), (empty[:, None] * in_channels + np.arange(in_channels)).ravel())
    kept = rng.choice(eligible, size=min(len(eligible), int(round(kept_fraction * out_channels * in_channels))), replace=False)
    ids = rng.integers(0, library_size, size=len(kept))
    ids[: min(len(kept), library_size)] = np.arange(min(len(kept), library_size))  # every pattern in use
    assignment = np.full(out_channels * in_channels, -1, dtype=np.int64)
    assignment[kept] = rng.permutation(ids)
    return LayerPatterns(library=library, assignment=assignment.reshape(out_channels, in_channels))


def masked_weight(rng: np.random.Generator, patterns: LayerPatterns) -> np.ndarray:
    """A random float32 (O, C, 3, 3) weight that is zero wherever `patterns` prunes."""
    mask = patterns.mask()
    return (rng.standard_normal(mask.shape).astype(np.float32) * mask).astype(np.float32)


def _weight_initializers(weight: np.ndarray, bias: Optional[np.ndarray],
                         weight_name: str = "W") -> tuple[list[onnx.TensorProto], list[str]]:
    """The float32 initializers `weight_name` (and B when there is a bias) and the conv node's inputs: X, W (, B)."""
    initializers = [numpy_helper.from_array(np.asarray(weight, dtype=np.float32), weight_name)]
    inputs = ["X", weight_name]
    if bias is not None:
        initializers.append(numpy_helper.from_array(np.asarray(bias, dtype=np.float32), "B"))
        inputs.append("B")
    return initializers, inputs


def _clip_bounds(lo: float, hi: float) -> list[onnx.TensorProto]:
    """The float32 scalars "lo" and "hi" that a Clip node reads."""
    return [numpy_helper.from_array(np.array(v, dtype=np.float32), n) for n, v in (("lo", lo), ("hi", hi))]


def _model_with_inputs(nodes, initializers, inputs, opset, functions=()) -> onnx.ModelProto:
    """`nodes` -> Y over the graph inputs `inputs` ((name, shape) pairs, X first) in a model of the default opset
    `opset`, plus ctprune's domain when `functions` are given."""
    y_dims = ["N", "O", "OH", "OW"][: len(inputs[0][1])]  # Y has X's rank
    graph = helper.make_graph(
        nodes, "layer", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, y_dims)], initializers,
    )
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(DOMAIN, VERSION)] if functions else [])
    return _with_ir(helper.make_model(graph, opset_imports=imports, functions=list(functions)))


def _with_ir(model: onnx.ModelProto) -> onnx.ModelProto:
    # the oldest IR version its opsets allow (onnx's newest may be newer than the installed onnxruntime reads)
    model.ir_version = max(MIN_IR_VERSION, helper.find_min_ir_version_for(list(model.opset_import), True))
    return model


def pattern_conv_layer_model(
    compact: CompactPatternWeights,
    input_shape: Sequence,
    bias: Optional[np.ndarray] = None,
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    activation: tuple[float, float] = (float("-inf"), float("inf")),
    opset: int = 17,
) -> onnx.ModelProto:
    """X -> PatternConv -> Y, carrying the model-local reference function."""
    initializers, inputs = _weight_initializers(compact.weights, bias)
    node = onnx.NodeProto()
    node.op_type, node.domain, node.name = "PatternConv", DOMAIN, "pattern_conv"
    node.input.extend(inputs)
    node.output.append("Y")
    for name, values in dict(compact.attributes(), strides=list(strides), pads=list(pads), dilations=[1, 1]).items():
        node.attribute.append(helper.make_attribute(name, values, attr_type=onnx.AttributeProto.INTS))
    node.attribute.append(helper.make_attribute("group", 1))
    node.attribute.append(helper.make_attribute("activation_min", float(activation[0])))
    node.attribute.append(helper.make_attribute("activation_max", float(activation[1])))
    return _model_with_inputs([node], initializers, [("X", list(input_shape))], opset, [pattern_conv_function(opset)])


def dense_conv_layer_model(
    weight: np.ndarray,
    input_shape: Sequence,
    bias: Optional[np.ndarray] = None,
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    activation: tuple[float, float] = (float("-inf"), float("inf")),
    opset: int = 17,
) -> onnx.ModelProto:
    """X -> Conv (-> Clip when an activation is given) -> Y: onnxruntime's own dense path on the same weights."""
    initializers, inputs = _weight_initializers(weight, bias)
    lo, hi = activation
    if np.isinf(lo) and np.isinf(hi):
        conv = helper.make_node("Conv", inputs, ["Y"], name="conv", strides=list(strides), pads=list(pads))
        return _model_with_inputs([conv], initializers, [("X", list(input_shape))], opset)
    initializers += _clip_bounds(lo, hi)
    conv = helper.make_node("Conv", inputs, ["conv_out"], name="conv", strides=list(strides), pads=list(pads))
    clip = helper.make_node("Clip", ["conv_out", "lo", "hi"], ["Y"], name="clip")
    return _model_with_inputs([conv, clip], initializers, [("X", list(input_shape))], opset)


def pattern_and_dense_models(
    rng: np.random.Generator,
    patterns: LayerPatterns,
    input_shape: Sequence,
    bias: bool = False,
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    activation: tuple[float, float] = (float("-inf"), float("inf")),
    opset: int = 17,
) -> tuple[onnx.ModelProto, onnx.ModelProto, CompactPatternWeights]:
    """Random masked weights for `patterns` as (PatternConv model, dense Conv model on the masked weight, compact)."""
    weight = masked_weight(rng, patterns)
    B = rng.standard_normal(weight.shape[0]).astype(np.float32) if bias else None
    compact = compact_from_dense(weight, patterns)
    return (
        pattern_conv_layer_model(compact, input_shape, B, strides, pads, activation, opset),
        dense_conv_layer_model(weight, input_shape, B, strides, pads, activation, opset),
        compact,
    )


# --- PatternConv in its storage order (ops/PatternConv.md), drawn filter by filter: the per-layer benchmark and the
# kernel tests. Models carry no reference function (they need ctprune's library); Z may be a graph input.


@dataclass
class PatternLayer:
    """A pruned 3x3 layer in PatternConv's storage order (ops/PatternConv.md) and as the dense masked weight."""

    patterns: np.ndarray  # (P, 4) int64
    kernel_filters: np.ndarray  # (K,) int64
    kernel_channels: np.ndarray
    kernel_patterns: np.ndarray
    weights: np.ndarray  # (K, 4) float32
    dense: np.ndarray  # (O, C, 3, 3) float32, zero where pruned

    @property
    def kept_kernels(self) -> int:
        return len(self.kernel_filters)


def random_pattern_layer(rng, out_channels, in_channels, kept_per_filter, library_size=8, block=None) -> PatternLayer:
    """A layer whose filter f keeps `kept_per_filter[f]` random input channels (an int applies to all filters), each
    with a random pattern from a random library of `library_size` distinct 4-of-9 shapes (all used when possible).

    block: filter-block structure (the CPU kernel computes runs of filters with identical kernel lists 16 at a time).
    An int cuts the filters into runs of that many (the last one shorter); a sequence gives the run sizes, the
    filters past them stay single. A run's filters are random output channels that keep the same channels with the
    same patterns (the first member's count; weights differ) and are adjacent in storage order."""
    if block is not None:
        return _block_pattern_layer(rng, out_channels, in_channels, kept_per_filter, library_size, block)
    counts = np.broadcast_to(np.asarray(kept_per_filter, dtype=np.int64), (out_channels,))
    library = ALL_PATTERNS[rng.choice(len(ALL_PATTERNS), library_size, replace=False)]
    total = int(counts.sum())
    pattern_ids = rng.integers(0, library_size, total)
    pattern_ids[: min(total, library_size)] = np.arange(min(total, library_size))
    pattern_ids = rng.permutation(pattern_ids)

    rows, i = [], 0
    for f in np.argsort(-counts, kind="stable"):  # filters by decreasing work
        channels = rng.choice(in_channels, int(counts[f]), replace=False)
        ids = pattern_ids[i : i + len(channels)]
        i += len(channels)
        rows += sorted((int(p), int(c), int(f)) for p, c in zip(ids, channels))
    return _layer_from_rows(rng, library, rows, out_channels, in_channels)


def _block_pattern_layer(rng, out_channels, in_channels, kept_per_filter, library_size, block) -> PatternLayer:
    counts = np.broadcast_to(np.asarray(kept_per_filter, dtype=np.int64), (out_channels,))
    library = ALL_PATTERNS[rng.choice(len(ALL_PATTERNS), library_size, replace=False)]
    if isinstance(block, (int, np.integer)):
        sizes = [min(int(block), out_channels - i) for i in range(0, out_channels, int(block))]
    else:
        sizes = [int(v) for v in block]
    assert sum(sizes) <= out_channels and all(v > 0 for v in sizes), (sizes, out_channels)
    sizes += [1] * (out_channels - sum(sizes))
    members = rng.permutation(out_channels)
    units = np.split(members, np.cumsum(sizes)[:-1])
    unit_counts = [int(counts[u[0]]) for u in units]
    # Storage order: runs by non-increasing kernel count, ties in random order; a run's members one after another.
    order = sorted(rng.permutation(len(units)).tolist(), key=lambda i: -unit_counts[i])
    rows, used = [], 0
    for i in order:
        channels = rng.choice(in_channels, unit_counts[i], replace=False)
        ids = rng.integers(0, library_size, unit_counts[i])
        if used < library_size:  # every pattern in use when there are enough kernels
            take = min(len(ids), library_size - used)
            ids[:take] = np.arange(used, used + take)
            used += take
        kernels = sorted((int(p), int(c)) for p, c in zip(ids, channels))
        rows += [(p, c, int(f)) for f in units[i] for p, c in kernels]
    return _layer_from_rows(rng, library, rows, out_channels, in_channels)


def _layer_from_rows(rng, library, rows, out_channels, in_channels) -> PatternLayer:
    """(pattern, channel, filter) rows in storage order -> the layer, with random weights and its dense form."""
    kernel_patterns = np.array([r[0] for r in rows], np.int64)
    kernel_channels = np.array([r[1] for r in rows], np.int64)
    kernel_filters = np.array([r[2] for r in rows], np.int64)
    weights = rng.standard_normal((len(rows), 4)).astype(np.float32)
    dense = np.zeros((out_channels, in_channels, 9), np.float32)
    for k in range(len(rows)):
        dense[kernel_filters[k], kernel_channels[k], library[kernel_patterns[k]]] = weights[k]
    return PatternLayer(library, kernel_filters, kernel_channels, kernel_patterns, weights,
                        dense.reshape(out_channels, in_channels, 3, 3))


def kept_per_filter_for_ratio(in_channels: int, ratio: float) -> int:
    """Kernels a filter keeps so that 9*C dense weights / (4 * kept) is about `ratio` (2.25 keeps every kernel)."""
    return max(1, min(in_channels, round(in_channels * 9 / 4 / ratio)))


def _graph_model(nodes, initializers, x_shape, opsets, z_shape=None) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, None if x_shape is None else list(x_shape))]
    if z_shape is not None:
        inputs.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, list(z_shape)))
    graph = helper.make_graph(nodes, "layer", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 8
    return model


def pattern_conv_model(layer: PatternLayer, x_shape, bias=None, strides=(1, 1), pads=(1, 1, 1, 1),
                       activation=(-math.inf, math.inf), z_shape=None, **overrides) -> onnx.ModelProto:
    """One PatternConv node (no reference function: it needs ctprune's library). `overrides` replace attributes;
    when they name any of the older per-kernel lists (kernel_filters, ...), the node carries that form instead of
    the compact one. z_shape: the residual Z becomes a graph input of that shape."""
    O, C = layer.dense.shape[:2]
    lists = (layer.kernel_filters, layer.kernel_channels, layer.kernel_patterns)
    if any(name in overrides for name in pattern_layout.PER_KERNEL):
        index = {name: values.tolist() for name, values in zip(pattern_layout.PER_KERNEL, lists)}
    else:
        index = pattern_layout.encode(*lists, len(layer.patterns))
    attrs = dict(weight_shape=[O, C, 3, 3], patterns=layer.patterns.ravel().tolist(), **index,
                 strides=list(strides), pads=list(pads), dilations=[1, 1], group=1,
                 activation_min=float(activation[0]), activation_max=float(activation[1]))
    attrs.update(overrides)
    inits, inputs = _weight_initializers(layer.weights, bias)
    if z_shape is not None:
        inputs += [""] * (3 - len(inputs)) + ["Z"]
    node = helper.make_node("PatternConv", inputs, ["Y"], domain=DOMAIN)
    for key, value in attrs.items():  # typed explicitly: a filter list may be empty (every kernel removed)
        kind = onnx.AttributeProto.INTS if isinstance(value, list) else None
        node.attribute.append(helper.make_attribute(key, value, attr_type=kind))
    return _graph_model([node], inits, x_shape, [("", 17), (DOMAIN, 1)], z_shape)


def dense_conv_model(layer: PatternLayer, x_shape, bias=None, strides=(1, 1), pads=(1, 1, 1, 1),
                     activation=(-math.inf, math.inf)) -> onnx.ModelProto:
    """onnxruntime's Conv on the masked dense weight, followed by Clip when there is an activation."""
    inits, inputs = _weight_initializers(layer.dense, bias, "Wd")
    lo, hi = activation
    clip = not (math.isinf(lo) and lo < 0 and math.isinf(hi) and hi > 0)
    nodes = [helper.make_node("Conv", inputs, ["Yc" if clip else "Y"], kernel_shape=[3, 3], strides=list(strides),
                              pads=list(pads))]
    if clip:
        inits += _clip_bounds(max(lo, -3.4e38), min(hi, 3.4e38))
        nodes.append(helper.make_node("Clip", ["Yc", "lo", "hi"], ["Y"]))
    return _graph_model(nodes, inits, x_shape, [("", 17)])



# --- SparseConv (ops/SparseConv.md): one random block-pruned Conv / FC layer, as a SparseConv model and as
# onnxruntime's dense Conv / Gemm on the same masked weight. Shared by tests/test_sparseconv_*.py and bench_layers.


def random_block_mask(
    rng: np.random.Generator,
    weight_shape: Sequence[int],
    density: float,
    block: int,
    group: int = 1,
    empty_blocks: int = 0,
) -> np.ndarray:
    """A bool mask of `weight_shape` ((O, Cg, kh, kw) or (O, I)) that is the same for the output channels of each
    block of `block` (within a group; the last block of a group may be partial), keeping round(density * columns)
    random columns per block, none in `empty_blocks` random blocks."""
    from ctprune.rewrite.sparse_conv import _blocks

    O = int(weight_shape[0])
    columns = int(np.prod(weight_shape[1:]))
    blocks = _blocks(weight_shape, block, group)
    keep = int(round(min(1.0, max(0.0, density)) * columns))
    empty = set(rng.choice(len(blocks), size=min(empty_blocks, len(blocks)), replace=False).tolist())
    mask = np.zeros((O, columns), dtype=bool)
    for block_id, (_, first, size) in enumerate(blocks):
        if block_id not in empty and keep:
            mask[first : first + size, rng.choice(columns, size=keep, replace=False)] = True
    return mask.reshape(tuple(weight_shape))


def masked_random_weight(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """Random float32 weights (He-scaled over the kept fan-in) where `mask` keeps, zero elsewhere."""
    fan_in = max(1.0, mask.reshape(mask.shape[0], -1).sum(axis=1).mean())
    w = rng.standard_normal(mask.shape).astype(np.float32) * np.float32(np.sqrt(2.0 / fan_in))
    w[w == 0] = 1e-3  # a kept weight must not be exactly zero: the compactor reads the mask from nonzeros
    return (w * mask).astype(np.float32)


def sparse_conv_layer_model(
    compact,
    input_shape: Sequence,
    bias: Optional[np.ndarray] = None,
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
    activation=None,
    z_shape: Optional[Sequence] = None,
    opset: int = 17,
    function: bool = True,
    **overrides,
) -> onnx.ModelProto:
    """X (and Z when z_shape is given) -> SparseConv -> Y, carrying the model-local function unless function=False.
    `overrides` replace node attributes (malformed-node tests)."""
    from ctprune.rewrite.sparse_conv import Activation, sparse_conv_function, sparse_conv_node

    initializers = compact.initializers("w")
    if bias is not None:
        initializers.append(numpy_helper.from_array(np.asarray(bias, dtype=np.float32), "B"))
    kwargs = {} if compact.is_fc else dict(strides=strides, pads=pads, dilations=dilations)
    node = sparse_conv_node(compact, "X", "Y", "w", name="sparse_conv", bias="B" if bias is not None else "",
                            residual="Z" if z_shape is not None else "", activation=activation or Activation(),
                            **kwargs)
    for key, value in overrides.items():
        for i, attr in enumerate(node.attribute):
            if attr.name == key:
                del node.attribute[i]
                break
        if value is not None:
            kind = onnx.AttributeProto.INTS if isinstance(value, list) else None
            node.attribute.append(helper.make_attribute(key, value, attr_type=kind))
    inputs = [("X", list(input_shape))] + ([("Z", list(z_shape))] if z_shape is not None else [])
    functions = [sparse_conv_function(opset, residual=z_shape is not None)] if function else []
    model = _model_with_inputs([node], initializers, inputs, opset, functions)
    if not function:
        model.opset_import.append(helper.make_opsetid(DOMAIN, VERSION))
    return model


def dense_layer_model(
    weight: np.ndarray,
    input_shape: Sequence,
    bias: Optional[np.ndarray] = None,
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
    group: int = 1,
    activation=None,
    z_shape: Optional[Sequence] = None,
    opset: int = 17,
) -> onnx.ModelProto:
    """onnxruntime's own ops on the dense weight: Conv (4-D weight) or Gemm transB=1 (2-D), then Add Z, then the
    activation as the ops real nets use (Clip / Relu, HardSigmoid + Mul, Sigmoid + Mul)."""
    from ctprune.ops.names import ACTIVATION_HARDSIGMOID_MUL, ACTIVATION_SIGMOID_MUL
    from ctprune.rewrite.sparse_conv import Activation

    act = activation or Activation()
    weight = np.asarray(weight, dtype=np.float32)
    initializers, inputs = _weight_initializers(weight, bias)
    if weight.ndim == 2:
        nodes = [helper.make_node("Gemm", inputs, ["t0"], transB=1)]
    else:
        nodes = [helper.make_node("Conv", inputs, ["t0"], strides=list(strides), pads=list(pads),
                                  dilations=list(dilations), group=int(group))]
    last = "t0"
    if z_shape is not None:
        nodes.append(helper.make_node("Add", [last, "Z"], ["t1"]))
        last = "t1"
    if not (np.isinf(act.min) and act.min < 0 and np.isinf(act.max) and act.max > 0):
        if act.min == 0.0 and np.isinf(act.max) and act.max > 0:
            nodes.append(helper.make_node("Relu", [last], ["t2"]))
        else:
            initializers += _clip_bounds(act.min, act.max)
            nodes.append(helper.make_node("Clip", [last, "lo", "hi"], ["t2"]))
        last = "t2"
    if act.kind == ACTIVATION_HARDSIGMOID_MUL:
        nodes.append(helper.make_node("HardSigmoid", [last], ["gate"], alpha=float(act.alpha), beta=float(act.beta)))
        nodes.append(helper.make_node("Mul", [last, "gate"], ["t3"]))
        last = "t3"
    elif act.kind == ACTIVATION_SIGMOID_MUL:
        nodes.append(helper.make_node("Sigmoid", [last], ["gate"]))
        nodes.append(helper.make_node("Mul", [last, "gate"], ["t3"]))
        last = "t3"
    nodes.append(helper.make_node("Identity", [last], ["Y"]))
    inputs_info = [("X", list(input_shape))] + ([("Z", list(z_shape))] if z_shape is not None else [])
    return _model_with_inputs(nodes, initializers, inputs_info, opset)


def sparse_and_dense_models(
    rng: np.random.Generator,
    weight_shape: Sequence[int],
    input_shape: Sequence,
    density: float,
    block: int,
    *,
    group: int = 1,
    empty_blocks: int = 0,
    bias: bool = False,
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
    activation=None,
    z_shape: Optional[Sequence] = None,
    opset: int = 17,
    function: bool = True,
):
    """A random block-pruned layer as (SparseConv model, dense Conv/Gemm model on the masked weight, compact)."""
    from ctprune.rewrite.sparse_conv import compact_sparse_from_dense

    mask = random_block_mask(rng, weight_shape, density, block, group, empty_blocks)
    weight = masked_random_weight(rng, mask)
    B = rng.standard_normal(weight_shape[0]).astype(np.float32) if bias else None
    compact = compact_sparse_from_dense(weight, block, group=group, mask=mask)
    sparse = sparse_conv_layer_model(compact, input_shape, B, strides, pads, dilations, activation, z_shape, opset,
                                     function)
    dense = dense_layer_model(weight, input_shape, B, strides, pads, dilations, group, activation, z_shape, opset)
    return sparse, dense, compact
