"""Residual branches that PreCropping may drop whole.

SynFlow on a residual net keeps almost nothing of some late blocks (densities of 0.000-0.008 on the examples'
ResNet-20 at 4x): the synaptic flow goes round them through the identity shortcut. Unstructured masking then leaves
those blocks as near-identities for free, but channel cropping cannot go below one channel multiple per group, so a
block the scores call empty would still cost, e.g., 64·8·9·2 weights at multiple 8 — a quarter of a 4x budget on
ResNet-20, taken from the layers the scores want dense. Rounding those blocks to nothing instead is the channel-level
equivalent of what the PAI method asked for: the Add becomes an Identity of its shortcut.

A *residual branch* here is the set of nodes computing one input of a two-input Add whose only non-constant input
from outside the set is the Add's other input (an identity shortcut), whose results are read only inside the set or by
the Add, which holds at least one Conv, and whose output has the shortcut's shape (so dropping it changes no shape).
Projection shortcuts, Sums of more inputs and branches that read other tensors are never dropped.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import onnx

from ctprune.graph.constants import ConstantTable
from ctprune.graph.edit import drop_unread
from ctprune.graph.readers import TensorReaders
from ctprune.graph.shapes import inferred_shape_table
from ctprune.pruning.precrop.groups import ChannelGraph, node_label
from ctprune.pruning.precrop.solve import TOLERANCE, allowed_counts, weight_model

MAX_BRANCH_NODES = 256  # a residual block is a handful of nodes; a walk that grows past this left the block


@dataclass(frozen=True)
class Branch:
    """One droppable residual branch: the Add (node label) it feeds, its shortcut tensor, its nodes and Convs."""

    add: str
    stream: str
    nodes: tuple[str, ...]
    convs: tuple[str, ...]


def residual_branches(model: onnx.ModelProto) -> list[Branch]:
    """Every residual branch of the main graph (see the module docstring), in node order."""
    graph = model.graph
    labels = [node_label(n) for n in graph.node]
    if len(set(labels)) != len(labels):
        return []  # branches are named by node label: with duplicate names, removing one could remove another
    consts = ConstantTable(graph)
    producer = {out: node for node in graph.node for out in node.output if out}
    index = TensorReaders(graph)
    readers = {name: [labels[i] for i in index.nodes(name)] for name in index}  # tensor -> labels of its readers
    graph_outputs = {o.name for o in graph.output}
    shapes = inferred_shape_table(model)
    branches = []
    for node in graph.node:
        if node.op_type != "Add" or len(node.input) != 2 or any(t in consts for t in node.input):
            continue
        for side in (0, 1):
            branch = _branch(node, node.input[side], node.input[1 - side], producer, readers, graph_outputs, consts,
                             shapes)
            if branch is not None:
                branches.append(branch)
                break
    return branches


def _branch(add, out, stream, producer, readers, graph_outputs, consts, shapes) -> Branch | None:
    if out == stream or out not in producer:
        return None
    shape_out, shape_stream = shapes.get(out), shapes.get(stream)
    if shape_out is None or shape_out != shape_stream or None in shape_out[1:]:
        return None  # dropping a broadcasting branch would change the Add's shape
    members: dict[str, onnx.NodeProto] = {}
    stack = [producer[out]]
    while stack:
        node = stack.pop()
        label = node_label(node)
        if label in members:
            continue
        if len(members) >= MAX_BRANCH_NODES or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                   for a in node.attribute):
            return None
        members[label] = node
        for name in node.input:
            if not name or name == stream or name in consts:
                continue  # constants stay; remove_branches drops those only the branch read
            if name not in producer:
                return None  # reads a graph input other than the shortcut
            stack.append(producer[name])
    add_label = node_label(add)
    for label, node in members.items():
        for name in node.output:
            if name in graph_outputs or any(r not in members and r != add_label for r in readers.get(name, ())):
                return None  # a result is used outside the branch
    if stream in {o for node in members.values() for o in node.output}:
        return None
    convs = tuple(label for label, node in members.items() if node.op_type == "Conv")
    if not convs:
        return None
    return Branch(add_label, stream, tuple(members), convs)


def remove_branches(model: onnx.ModelProto, branches: list[Branch]) -> onnx.ModelProto:
    """A copy of `model` without `branches`: each Add becomes an Identity of its shortcut (same output name), the
    branch's nodes go, and so do the constants only they read (graph/edit.drop_unread) and their value_info."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    before = TensorReaders(graph)
    gone = {label for b in branches for label in b.nodes}
    stream_of = {b.add: b.stream for b in branches}
    nodes = []
    for node in graph.node:
        label = node_label(node)
        if label in gone:
            continue
        if label in stream_of:
            node = onnx.helper.make_node("Identity", [stream_of[label]], list(node.output), name=label)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unread(graph, [name for name, count in before.items() if count > 0])
    produced = {o for node in graph.node for o in node.output}
    info = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(info)
    return out


def branches_to_drop(model: onnx.ModelProto, cg: ChannelGraph, densities: dict[str, float], ratio: float,
                     multiple: int) -> list[Branch]:
    """The residual branches whose PAI densities ask for fewer than half the weights the branch would keep at its
    narrowest (its own channel groups at one channel multiple): nearer to nothing than to the floor. Most empty
    first, and never so many that the rest of the model would need no cropping (ratio left <= 1 + TOLERANCE)."""
    wm = weight_model(cg)
    full = wm.weights(wm.sizes)
    budget = full.sum() / ratio
    index = {layer.name: i for i, layer in enumerate(wm.layers)}
    writers: dict[str, set[str]] = defaultdict(set)
    for layer in cg.layers:
        for space, _ in layer.out_layout.segments:
            writers[cg.space_group[space]].add(layer.name)
    candidates = []
    for branch in residual_branches(model):
        rows = [index[c] for c in branch.convs if c in index]
        if len(rows) != len(branch.convs):
            continue  # a Conv the weight model does not know (should not happen): leave the branch alone
        floor = wm.sizes.copy()
        for g, key in enumerate(wm.keys):
            group = cg.groups[key]
            if not group.frozen and writers[key] and writers[key] <= set(branch.convs):
                floor[g] = allowed_counts(group.size, multiple, False)[0]
        kept_at_floor = wm.weights(floor)[rows].sum()
        asked = sum(min(1.0, densities.get(c, 1.0)) * full[i] for c, i in zip(branch.convs, rows))
        if asked < 0.5 * kept_at_floor:
            candidates.append((asked / kept_at_floor, branch, full[rows].sum()))
    dropped, left = [], full.sum()
    for _, branch, weights in sorted(candidates, key=lambda c: c[0]):
        if (left - weights) / budget <= 1 + TOLERANCE:
            break
        dropped.append(branch)
        left -= weights
    return dropped
