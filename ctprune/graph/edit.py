"""Small edits every graph surgery shares (the channel crop, branch removal, the PatternConv/SparseConv rewrite):
fresh tensor names, and the sweep that removes what an edit left unread."""

from __future__ import annotations

import onnx

from ctprune.graph.constants import ConstantTable
from ctprune.graph.readers import TensorReaders

__all__ = ["taken_names", "unique_name", "drop_unread", "forget_value_info"]


def taken_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name the main graph uses (node inputs and outputs, initializers, inputs, outputs, value_info)."""
    taken = {name for node in graph.node for name in list(node.input) + list(node.output)}
    taken |= {t.name for t in graph.initializer}
    return taken | {v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)}


def unique_name(wanted: str, taken: set) -> str:
    """`wanted`, or `wanted_1`, `wanted_2`, ... whichever is free first; the name is added to `taken`."""
    name, n = wanted, 1
    while name in taken:
        name, n = f"{wanted}_{n}", n + 1
    taken.add(name)
    return name


def drop_unread(graph: onnx.GraphProto, names) -> None:
    """Remove the constants among `names` that nothing reads any more (no node slot, nested graph or graph output):
    Constant nodes, Identity nodes aliasing a constant (what they read becomes a candidate in turn), then
    initializers, with their graph-input (IR 3 style) and value_info entries. Anything not in `names` stays, so an
    edit passes what it stopped reading and a tensor that was unread before it is left alone."""
    candidates = set(names)
    gone: set[str] = set()
    while True:
        reads, consts = TensorReaders(graph), ConstantTable(graph)
        dead = [i for i, node in enumerate(graph.node)
                if node.op_type in ("Constant", "Identity") and node.output and node.output[0] in candidates
                and node.output[0] in consts and reads[node.output[0]] == 0]
        if not dead:
            break
        for i in reversed(dead):
            gone.add(graph.node[i].output[0])
            candidates.update(name for name in graph.node[i].input if name)
            del graph.node[i]
    reads = TensorReaders(graph)
    unread = [i for i, t in enumerate(graph.initializer) if t.name in candidates and reads[t.name] == 0]
    for i in reversed(unread):
        gone.add(graph.initializer[i].name)
        del graph.initializer[i]  # by index: rebuilding the list would copy every weight
    if gone:
        for field in (graph.input, graph.value_info):
            keep = [v for v in field if v.name not in gone]
            del field[:]
            field.extend(keep)


def forget_value_info(graph: onnx.GraphProto, names) -> None:
    """Drop the value_info of tensors (a name or a set of names) an edit made internal: one pass for all."""
    names = {names} if isinstance(names, str) else set(names)
    if not names:
        return
    keep = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(keep)
