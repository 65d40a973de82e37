"""One-layer models for tests and per-layer benchmarks: a PatternConv node and the dense Conv it stands for.

`random_layer_patterns` draws a layer's pruning the way ClickTrain leaves it (a library of distinct 4-of-9 patterns,
a fraction of whole kernels removed); `pattern_conv_layer_model` / `dense_conv_layer_model` wrap one layer in a model
that onnxruntime runs, with or without ctprune's library.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ctprune.ops.names import DOMAIN, VERSION
from ctprune.ops.reference import pattern_conv_function
from ctprune.rewrite.model import MIN_IR_VERSION
from ctprune.rewrite.pattern_conv import CompactPatternWeights, LayerPatterns, compact_from_dense

ALL_PATTERNS = np.array(list(itertools.combinations(range(9), 4)), dtype=np.int64)  # the 126 4-of-9 shapes


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


def _single_node_model(node, input_shape, initializers, opset, functions=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node],
        "layer",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", "O", "OH", "OW"])],
        initializers,
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
    initializers = [numpy_helper.from_array(compact.weights.astype(np.float32), "W")]
    inputs = ["X", "W"]
    if bias is not None:
        initializers.append(numpy_helper.from_array(np.asarray(bias, dtype=np.float32), "B"))
        inputs.append("B")
    node = onnx.NodeProto()
    node.op_type, node.domain, node.name = "PatternConv", DOMAIN, "pattern_conv"
    node.input.extend(inputs)
    node.output.append("Y")
    for name, values in dict(compact.attributes(), strides=list(strides), pads=list(pads), dilations=[1, 1]).items():
        node.attribute.append(helper.make_attribute(name, values, attr_type=onnx.AttributeProto.INTS))
    node.attribute.append(helper.make_attribute("group", 1))
    node.attribute.append(helper.make_attribute("activation_min", float(activation[0])))
    node.attribute.append(helper.make_attribute("activation_max", float(activation[1])))
    return _single_node_model(node, input_shape, initializers, opset, [pattern_conv_function(opset)])


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
    initializers = [numpy_helper.from_array(np.asarray(weight, dtype=np.float32), "W")]
    inputs = ["X", "W"]
    if bias is not None:
        initializers.append(numpy_helper.from_array(np.asarray(bias, dtype=np.float32), "B"))
        inputs.append("B")
    lo, hi = activation
    if np.isinf(lo) and np.isinf(hi):
        conv = helper.make_node("Conv", inputs, ["Y"], name="conv", strides=list(strides), pads=list(pads))
        return _single_node_model(conv, input_shape, initializers, opset)
    initializers += [numpy_helper.from_array(np.array(v, dtype=np.float32), n) for n, v in (("lo", lo), ("hi", hi))]
    conv = helper.make_node("Conv", inputs, ["conv_out"], name="conv", strides=list(strides), pads=list(pads))
    clip = helper.make_node("Clip", ["conv_out", "lo", "hi"], ["Y"], name="clip")
    graph = helper.make_graph(
        [conv, clip],
        "layer",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", "O", "OH", "OW"])],
        initializers,
    )
    return _with_ir(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


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
