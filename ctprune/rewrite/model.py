"""Whole-model rewrite: pattern-pruned 3x3 Conv nodes -> `ai.ctprune.PatternConv`, everything else untouched.

Plain protobuf surgery on a copy of the model, so names, order, metadata and every other node stay byte-for-byte what
they were. Per listed Conv (3x3, group 1, dilation 1, weight from an initializer or a Constant node):
- the node becomes a PatternConv of the same name at the same place, with a compact weight initializer
  `<weight>.pattern` (K, 4) and the spec's attributes; the bias input is reused as it is;
- an inference BatchNormalization with constant parameters that is the Conv output's only reader is folded into the
  compact weights and a new bias (onnxruntime folds it into a dense Conv, not into an op it does not know);
- an Add (or two-input Sum) that is the only reader of what comes out and whose other input (the residual: a ResNet
  shortcut) has the same shape is fused as the input Z; the PatternConv then sits where the Add was (the shortcut
  may be computed after the Conv) and writes its output;
- a Relu or a Clip with constant bounds that is the only reader of what comes out (Conv, BatchNormalization or Add)
  is fused (activation_min/max); the fused node writes the last fused node's output name, so the graph outside is
  unchanged;
- the dense weight (and a fused Clip's bounds, a folded BatchNormalization's parameters) are dropped when nothing
  else reads them, from the initializers and, for IR-3 style models, from the graph inputs too.
The model gains the `ai.ctprune` opset import (version 1) and the model-local PatternConv function, stamped with the
model's default-domain opset; where any residual was fused, the function's form with Z, and every PatternConv node
without a residual gets a shared one-element zero as Z (ops/PatternConv.md). A model below opset 13 is first upgraded
with onnx.version_converter (the function needs opset >= 13), and a model below IR version 8 is raised to 8
(model-local functions need it); an IR-3 model's initializers leave the graph inputs then (IR 3 required them there;
from IR 4 on they would read as overridable).

Layers are keyed by Conv node name; for graphs whose nodes have no names, a key may also be the Conv's output name.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import AttributeProto, helper, numpy_helper

from ctprune.errors import GraphError
from ctprune.graph.normalize import infer_shapes
from ctprune.ops.names import DOMAIN, MIN_OPSET, OP_TYPE, VERSION
from ctprune.ops.reference import pattern_conv_function
from ctprune.rewrite.pattern_conv import CompactPatternWeights, LayerPatterns, compact_from_dense

log = logging.getLogger(__name__)

MIN_IR_VERSION = 8  # model-local functions
RESIDUAL_OPS = ("Add", "Sum")  # Sum of two inputs is an Add (older exporters, e.g. Caffe2's ResNet-50)


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise GraphError("the model imports no default-domain (ai.onnx) opset")


_DETACHED = "ctprune-detached-weight"
_DETACH_MIN_ELEMENTS = 1024  # weights above this size skip the converter's serialization round trip


def _copy_fields(source, target, skip: str) -> None:
    """Copy every set field of a protobuf message but one (target.CopyFrom(source) without the big part)."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def _detached(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """A copy of `model` whose large weights are placeholders (name, type, dims; marked external), and those weights:
    for passes that read the graph but not weight values, without copying hundreds of MB."""
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    _copy_fields(model.graph, light.graph, skip="initializer")
    weights = {}
    for tensor in model.graph.initializer:
        if int(np.prod(tensor.dims)) > _DETACH_MIN_ELEMENTS and tensor.data_location != onnx.TensorProto.EXTERNAL:
            weights[tensor.name] = tensor
            placeholder = light.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
            placeholder.data_location = onnx.TensorProto.EXTERNAL
            placeholder.external_data.add(key="location", value=_DETACHED)
        else:
            light.graph.initializer.append(tensor)
    return light, weights


def _convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """onnx.version_converter run on the graph with its large weights detached: the converter serializes the whole
    model both ways (for VGG-19, 13 of 14 seconds), and its adapters do not read weight values."""
    light, weights = _detached(model)
    converted = onnx.version_converter.convert_version(light, opset)
    for tensor in converted.graph.initializer:
        if any(entry.value == _DETACHED for entry in tensor.external_data):
            tensor.CopyFrom(weights[tensor.name])
    return converted


def _upgraded(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy at opset >= 13 and IR version >= 8."""
    opset = default_opset(model)
    if opset < MIN_OPSET:
        log.info("upgrading the model from opset %d to %d for the PatternConv function", opset, MIN_OPSET)
        try:
            model = _convert_opset(model, MIN_OPSET)
        except Exception as err:  # the converter raises bare RuntimeErrors naming the op
            raise GraphError(f"could not upgrade the model from opset {opset} to {MIN_OPSET}: {err}") from err
    else:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    if model.ir_version < 4:
        # IR 3 had to list every initializer as a graph input; from IR 4 on such an input means "a default the
        # caller may override", which blocks constant folding. Dropping them keeps the IR-3 meaning.
        initializers = {t.name for t in model.graph.initializer}
        real_inputs = [v for v in model.graph.input if v.name not in initializers]
        del model.graph.input[:]
        model.graph.input.extend(real_inputs)
    model.ir_version = max(model.ir_version, MIN_IR_VERSION)
    return model


def _subgraph_reads(graph: onnx.GraphProto) -> Counter:
    """Names read by nodes of nested graphs (If/Loop/Scan bodies may read outer-scope tensors)."""
    reads = Counter()
    for node in graph.node:
        for attr in node.attribute:
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                for inner in sub.node:
                    reads.update(name for name in inner.input if name)
                reads.update(_subgraph_reads(sub))
    return reads


def _reads(graph: onnx.GraphProto) -> Counter:
    """How many times each tensor name is read: node inputs (nested graphs included) and graph outputs."""
    reads = Counter(name for node in graph.node for name in node.input if name)
    reads.update(_subgraph_reads(graph))
    reads.update(out.name for out in graph.output)
    return reads


def _find_conv(graph: onnx.GraphProto, key: str) -> int:
    by_name = [i for i, node in enumerate(graph.node) if node.name == key]
    if len(by_name) > 1:
        raise GraphError(f"{len(by_name)} nodes are named {key!r}; the rewrite needs unique Conv names")
    if not by_name:
        by_name = [i for i, node in enumerate(graph.node) if node.op_type == "Conv" and node.output[0] == key]
    if not by_name:
        raise GraphError(f"no Conv node named {key!r} (nor one writing a tensor of that name) in the main graph")
    index = by_name[0]
    node = graph.node[index]
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
        raise GraphError(f"node {key!r} is a {node.domain or 'ai.onnx'}.{node.op_type}, not a Conv")
    return index


def _constant_value(graph: onnx.GraphProto, name: str, initializers: dict) -> np.ndarray | None:
    """The value of tensor `name` when it is an initializer or a Constant node's `value`; None otherwise."""
    if name in initializers:
        return numpy_helper.to_array(initializers[name])
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
                if attr.name == "value_float":
                    return np.array(attr.f, dtype=np.float32)
            return None
    return None


def _conv_geometry(node: onnx.NodeProto, where: str) -> tuple[list[int], list[int]]:
    """(strides, pads) of a Conv PatternConv can take; GraphError for what it cannot."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if list(attrs.get("kernel_shape", [3, 3])) != [3, 3]:
        raise GraphError(f"{where}: kernel_shape {list(attrs['kernel_shape'])} is not 3x3")
    if int(attrs.get("group", 1)) != 1:
        raise GraphError(f"{where}: group {attrs['group']} is not 1 (PatternConv is for ordinary 3x3 Convs)")
    if any(int(d) != 1 for d in attrs.get("dilations", [1, 1])):
        raise GraphError(f"{where}: dilations {list(attrs['dilations'])} are not 1")
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        raise GraphError(f"{where}: auto_pad {auto_pad} is not supported; export the model with explicit pads")
    strides = [int(s) for s in attrs.get("strides", [1, 1])]
    pads = [int(p) for p in attrs.get("pads", [0, 0, 0, 0])] if auto_pad == "NOTSET" else [0, 0, 0, 0]
    if len(strides) != 2 or len(pads) != 4:
        raise GraphError(f"{where}: not a 2-D Conv (strides {strides}, pads {pads})")
    return strides, pads


def _fusable_activation(graph, conv_output, reads, initializers) -> tuple[int, float, float] | None:
    """(node index, min, max) of a Relu / constant Clip that is the only reader of conv_output, else None."""
    index = _only_reader(graph, conv_output, reads)  # None: also read by a graph output, a nested graph, or twice
    if index is None:
        return None
    node = graph.node[index]
    if node.domain not in ("", "ai.onnx") or node.input[0] != conv_output:
        return None
    if node.op_type == "Relu":
        return index, 0.0, float("inf")
    if node.op_type == "Clip":
        bounds = [float("-inf"), float("inf")]
        for slot, name in enumerate(node.input[1:3]):
            if name:
                value = _constant_value(graph, name, initializers)
                if value is None or value.size != 1:
                    return None
                bounds[slot] = float(value.reshape(()))
        for attr in node.attribute:  # Clip before opset 11 (not reached after the upgrade, kept for safety)
            if attr.name in ("min", "max"):
                bounds[attr.name == "max"] = float(attr.f)
        return index, bounds[0], bounds[1]
    return None


def _only_reader(graph, name, reads) -> int | None:
    """Index of the one node that reads `name`, if nothing else (graph output, nested graph, a second slot) does."""
    readers = [i for i, node in enumerate(graph.node) if name in node.input]
    return readers[0] if len(readers) == 1 and reads[name] == 1 else None


def _fusable_batchnorm(graph, conv_output, reads, initializers) -> tuple[int, np.ndarray, np.ndarray] | None:
    """(node index, scale, shift) of an inference-mode BatchNormalization with constant parameters that is the only
    reader of conv_output (y = x * scale + shift per channel), else None."""
    index = _only_reader(graph, conv_output, reads)
    if index is None:
        return None
    node = graph.node[index]
    if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx") or len(node.input) != 5:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if int(attrs.get("training_mode", 0)) != 0 or sum(1 for name in node.output if name) != 1:
        return None
    values = [_constant_value(graph, name, initializers) for name in node.input[1:]]
    if any(v is None for v in values):
        return None
    gamma, beta, mean, var = (np.asarray(v, dtype=np.float64).reshape(-1) for v in values)
    scale = gamma / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
    return index, scale, beta - mean * scale


def _fold_batchnorm(graph, conv, compact, bn, initializers, taken) -> tuple[CompactPatternWeights, str] | None:
    """The compact weights and the name of a new bias initializer with the BatchNormalization folded in, or None
    where the Conv's bias is not a constant or the shapes disagree."""
    _, scale, shift = bn
    out_channels = compact.weight_shape[0]
    bias = np.zeros(out_channels)
    if len(conv.input) > 2 and conv.input[2]:
        bias = _constant_value(graph, conv.input[2], initializers)
        if bias is None:
            return None
    if scale.shape != (out_channels,) or np.size(bias) != out_channels:
        return None
    weights = (compact.weights * scale[compact.kernel_filters][:, None]).astype(np.float32)
    name = _unique_name(f"{conv.name or conv.output[0]}.folded_bias", taken)
    graph.initializer.append(numpy_helper.from_array((bias.reshape(-1) * scale + shift).astype(np.float32), name))
    return dataclasses.replace(compact, weights=weights), name


def _fusable_residual(graph, conv_output, reads, shapes: Mapping[str, tuple]) -> tuple[int, str] | None:
    """(node index, residual name) of an Add (or two-input Sum) that is the only reader of conv_output and adds a
    tensor of the same static shape (no broadcasting), else None."""
    index = _only_reader(graph, conv_output, reads)
    if index is None:
        return None
    node = graph.node[index]
    if node.op_type not in RESIDUAL_OPS or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    residual = node.input[1] if node.input[0] == conv_output else node.input[0]
    if not residual or residual == conv_output:
        return None
    ours, theirs = shapes.get(conv_output), shapes.get(residual)
    if ours is None or ours != theirs or any(d is None for d in ours):
        return None
    return index, residual


def _shapes_of(model: onnx.ModelProto) -> dict[str, tuple]:
    """Tensor name -> inferred dims (int, or the dim_param string; None where unknown), without touching `model`."""
    probe, _ = _detached(model)
    infer_shapes(probe)
    shapes = {}
    for vi in list(probe.graph.input) + list(probe.graph.value_info) + list(probe.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
    for tensor in model.graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
    return shapes


def _unique_name(wanted: str, taken: set) -> str:
    name, n = wanted, 1
    while name in taken:
        name, n = f"{wanted}_{n}", n + 1
    taken.add(name)
    return name


def _pattern_conv_node(conv, inputs, output, compact: CompactPatternWeights, strides, pads, lo, hi) -> onnx.NodeProto:
    node = onnx.NodeProto()
    node.op_type, node.domain, node.name = OP_TYPE, DOMAIN, conv.name
    node.doc_string = conv.doc_string
    node.metadata_props.extend(conv.metadata_props)
    node.input.extend(inputs)
    node.output.append(output)
    ints = dict(compact.attributes(), strides=strides, pads=pads, dilations=[1, 1])
    for name, values in ints.items():
        # explicit type: a layer with every kernel removed has empty kernel_* lists
        node.attribute.append(helper.make_attribute(name, values, attr_type=AttributeProto.INTS))
    node.attribute.append(helper.make_attribute("group", 1))
    node.attribute.append(helper.make_attribute("activation_min", float(lo)))
    node.attribute.append(helper.make_attribute("activation_max", float(hi)))
    return node


def _drop_unread(graph: onnx.GraphProto, names: set) -> None:
    """Remove initializers / Constant nodes (and IR-3 graph inputs, value_info) for names nothing reads any more."""
    reads = _reads(graph)
    gone = {name for name in names if reads[name] == 0}
    if not gone:
        return
    for i in reversed([i for i, t in enumerate(graph.initializer) if t.name in gone]):
        del graph.initializer[i]  # by index: rebuilding the list would copy every weight
    for field in (graph.input, graph.value_info):
        keep = [v for v in field if v.name not in gone]
        del field[:]
        field.extend(keep)
    keep = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] in gone)]
    del graph.node[:]
    graph.node.extend(keep)


def _forget_value_info(graph: onnx.GraphProto, name: str) -> None:
    """Drop the value_info of a tensor that a fusion made internal."""
    keep = [v for v in graph.value_info if v.name != name]
    del graph.value_info[:]
    graph.value_info.extend(keep)


def _give_every_node_a_residual(graph: onnx.GraphProto, zero_name: str) -> None:
    """Every PatternConv node without a Z reads a shared one-element zero (the function's residual form needs one)."""
    graph.initializer.append(numpy_helper.from_array(np.zeros(1, dtype=np.float32), zero_name))
    for node in graph.node:
        if node.op_type == OP_TYPE and node.domain == DOMAIN and len(node.input) < 4:
            node.input.extend([""] * (3 - len(node.input)) + [zero_name])


def _add_function(model: onnx.ModelProto, residual: bool = False) -> None:
    for entry in model.opset_import:
        if entry.domain == DOMAIN and entry.version != VERSION:
            raise GraphError(f"the model already imports {DOMAIN} version {entry.version}; this ctprune writes {VERSION}")
    if not any(entry.domain == DOMAIN for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, VERSION))
    keep = [f for f in model.functions if not (f.domain == DOMAIN and f.name == OP_TYPE)]
    del model.functions[:]
    model.functions.extend(keep)
    model.functions.append(pattern_conv_function(default_opset(model), residual=residual))


def rewrite_model(
    model: onnx.ModelProto, layers: Mapping[str, LayerPatterns], *, require_masked: bool = True
) -> onnx.ModelProto:
    """A new model where each Conv named in `layers` is a PatternConv (see the module doc); `model` is not modified.

    `require_masked`: weights outside a layer's assigned patterns must be zero (GraphError otherwise); False drops them.
    """
    model = _upgraded(model)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    taken = {n for node in graph.node for n in list(node.input) + list(node.output)}
    taken |= set(initializers) | {v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
    indices = {key: _find_conv(graph, key) for key in layers}
    if len(set(indices.values())) != len(indices):
        raise GraphError("two keys of the layer map name the same Conv node")

    reads = _reads(graph)
    # Shapes decide which residual Adds fuse; inferred once, before any node changes (only if some Add could fuse).
    shapes = _shapes_of(model) if any(node.op_type in RESIDUAL_OPS for node in graph.node) else {}
    fused_away, maybe_unread, with_residual = set(), set(), False
    for key, index in sorted(indices.items(), key=lambda item: item[1]):
        conv = graph.node[index]
        where = f"Conv node {key!r}"
        strides, pads = _conv_geometry(conv, where)
        weight = _constant_value(graph, conv.input[1], initializers)
        if weight is None:
            raise GraphError(f"{where}: its weight {conv.input[1]!r} is not an initializer or a Constant")
        if weight.dtype != np.float32:
            raise GraphError(f"{where}: PatternConv takes float32 weights, {conv.input[1]!r} is {weight.dtype}")
        compact = compact_from_dense(weight, layers[key], require_masked=require_masked, where=where)

        output, lo, hi, place = conv.output[0], float("-inf"), float("inf"), index
        bias = conv.input[2] if len(conv.input) > 2 else ""
        bn = _fusable_batchnorm(graph, output, reads, initializers)
        folded = _fold_batchnorm(graph, conv, compact, bn, initializers, taken) if bn is not None else None
        if folded is not None:
            compact, bias = folded
            bn_node = graph.node[bn[0]]
            fused_away.add(bn[0])
            maybe_unread.update(name for name in list(bn_node.input[1:]) + list(conv.input[2:]) if name)
            _forget_value_info(graph, output)
            output = bn_node.output[0]
        residual = _fusable_residual(graph, output, reads, shapes)
        if residual is not None:
            # The node goes where the Add was: the residual may be computed after the Conv.
            place, residual = residual
            fused_away.add(index)
            _forget_value_info(graph, output)
            output = graph.node[place].output[0]
        activation = _fusable_activation(graph, output, reads, initializers)
        if activation is not None:
            act_index, lo, hi = activation
            act = graph.node[act_index]
            fused_away.add(act_index)
            maybe_unread.update(name for name in act.input[1:] if name)
            _forget_value_info(graph, output)
            output = act.output[0]

        weight_name = _unique_name(f"{conv.input[1]}.pattern", taken)
        graph.initializer.append(numpy_helper.from_array(compact.weights, weight_name))
        inputs = [conv.input[0], weight_name] + ([bias, residual] if residual else [bias] if bias else [])
        with_residual |= residual is not None
        maybe_unread.add(conv.input[1])
        # `conv` is a view into graph.node: build the new node before writing it over `place`
        graph.node[place].CopyFrom(_pattern_conv_node(conv, inputs, output, compact, strides, pads, lo, hi))
        log.debug("%s -> PatternConv: %d of %d kernels kept", key, len(compact.weights), weight.shape[0] * weight.shape[1])

    nodes = [node for i, node in enumerate(graph.node) if i not in fused_away]
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unread(graph, maybe_unread)
    if with_residual:
        _give_every_node_a_residual(graph, _unique_name("ctprune.zero_residual", taken))
    _add_function(model, residual=with_residual)
    return model
