"""Crop channels out of an ONNX graph: smaller standard Conv/BN/Gemm constants, consistent shapes.

Given kept channel indices per `ChannelGroup`, every recorded `Slice` cuts its constant along one axis, depthwise Convs
get their new `group`, Reshapes with a constant shape get their new channel count. A constant that several nodes share is
copied per distinct cut before slicing, so one consumer's crop never breaks another. IR-version-3 graphs list
initializers as graph inputs too: those inputs follow the new shapes. Graph inputs and outputs are never cropped (their
groups are frozen in groups.py), and value_info is re-inferred from scratch.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx

from ctprune.errors import GraphError
from ctprune.graph.constants import ConstantTable
from ctprune.graph.edit import drop_unread, taken_names, unique_name
from ctprune.graph.readers import TensorReaders
from ctprune.pruning.precrop.groups import ChannelGraph, channel_graph, node_label

log = logging.getLogger(__name__)


def crop_model(model: onnx.ModelProto, keep: dict[str, np.ndarray], cg: ChannelGraph | None = None) -> onnx.ModelProto:
    """A copy of `model` with only the `keep[group key]` channels of every group (frozen groups must keep all)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    cg = cg or channel_graph(out)
    _check_plan(cg, keep)
    graph = out.graph
    nodes = {node_label(n): n for n in graph.node}
    cuts, new_shapes, const_of = _cuts(cg, keep, nodes)
    uses = TensorReaders(graph)
    _write_cut_constants(graph, nodes, uses, cuts, new_shapes, const_of)
    for label, layout in cg.depthwise_convs.items():
        channels = len(cg.kept_features(layout, keep))
        for attr in nodes[label].attribute:
            if attr.name == "group":
                attr.i = channels
    drop_unread(graph, [name for name, count in uses.items() if count > 0])
    _sync_graph_inputs(out)
    _reinfer_value_info(out)
    return out


def _check_plan(cg: ChannelGraph, keep: dict[str, np.ndarray]) -> None:
    for key, group in cg.groups.items():
        kept = keep.get(key)
        if kept is None:
            raise GraphError(f"the crop plan has no entry for {group.describe()}; was it made for another model?")
        if group.frozen and len(kept) != group.size:
            raise GraphError(f"the crop plan cuts {group.describe()}, which must stay whole: {group.frozen}")
        if len(kept) == 0 or kept.max(initial=0) >= group.size:
            raise GraphError(f"the crop plan's channels for {group.describe()} are out of range")


def _cuts(cg: ChannelGraph, keep: dict[str, np.ndarray], nodes: dict[str, onnx.NodeProto]):
    """Per (node, input slot) that reads a constant to be cut: the cuts (axis, indices) it needs, or for a Reshape's
    shape the new value of dim 1; and the constant each such site reads."""
    cuts: dict[tuple[str, int], list[tuple[int, np.ndarray]]] = defaultdict(list)
    const_of: dict[tuple[str, int], str] = {}
    for s in cg.slices:
        idx = cg.kept_features(s.layout, keep)
        if len(idx) == s.layout.features:
            continue
        cuts[(s.node, s.slot)].append((s.axis, idx))
        const_of[(s.node, s.slot)] = s.const

    new_shapes: dict[tuple[str, int], int] = {}
    for label, (slot, layout) in cg.reshapes.items():
        kept_features = len(cg.kept_features(layout, keep))
        if kept_features != layout.features:
            new_shapes[(label, slot)] = kept_features
            const_of[(label, slot)] = nodes[label].input[slot]
    return cuts, new_shapes, const_of


def _write_cut_constants(graph: onnx.GraphProto, nodes: dict[str, onnx.NodeProto], uses: TensorReaders,
                         cuts, new_shapes, const_of) -> None:
    """Replace every cut constant; copy a constant for every reader whose cut differs from the others'."""
    consts = ConstantTable(graph)
    taken = taken_names(graph)
    by_const: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for site, name in const_of.items():
        by_const[name].append(site)
    for name, sites in by_const.items():
        original = consts.get(name)
        values = [_cut_value(original, cuts[site], new_shapes.get(site)) for site in sites]
        differ = any(v.shape != values[0].shape or not np.array_equal(values[0], v) for v in values[1:])
        shared = name in consts.aliases or uses[name] > len(sites) or differ
        if not shared:
            consts.set(name, values[0])
            continue
        log.debug("constant %r has %d reader(s)%s: a copy per differing cut", name, uses[name],
                  " behind an Identity" if name in consts.aliases else "")
        first = 0
        if uses[name] == len(sites) and name not in consts.aliases:  # every reader is cut: the first keeps the name
            consts.set(name, values[0])
            first = 1
        for site, v in list(zip(sites, values))[first:]:
            copy_name = unique_name(f"{name}__crop", taken)
            graph.initializer.append(onnx.numpy_helper.from_array(np.ascontiguousarray(v), copy_name))
            node = nodes[site[0]]
            node.input[site[1]] = copy_name


def _cut_value(original: np.ndarray, cuts: list[tuple[int, np.ndarray]], new_channels: int | None) -> np.ndarray:
    """The constant one reader sees: a Reshape shape with a new dim 1, or `original` taken along every cut."""
    if new_channels is not None:
        v = original.copy()
        v[1] = new_channels
        return v
    v = original
    for axis, idx in cuts:
        v = np.take(v, idx, axis=axis)
    return v


def _reinfer_value_info(model: onnx.ModelProto) -> None:
    del model.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        model.graph.value_info.extend(inferred.graph.value_info)
    except Exception as exc:  # a model onnx cannot infer is still valid; onnxruntime infers at load time
        log.warning("shape inference on the cropped model failed: %s", exc)


def _sync_graph_inputs(model: onnx.ModelProto) -> None:
    """Make initializers that are also graph inputs (IR 3 style) carry their new shapes; add inputs for new copies."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    input_names = {i.name for i in graph.input}
    listed = [i for i in graph.input if i.name in inits]
    for vi in listed:
        t = inits[vi.name]
        vi.CopyFrom(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    if model.ir_version < 4:
        for t in graph.initializer:
            if t.name not in input_names:
                graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
