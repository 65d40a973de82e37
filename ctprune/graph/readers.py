"""What reads each tensor of a graph, indexed once: the one place that answers "who reads this name?".

Scanning every node for each question made the rewrite quadratic in the node count (a 3,000-Conv chain spent 67 of
103 s there). `TensorReaders(graph)` walks the graph once; each question is then a dictionary lookup.

Reads are counted the way fusion needs them: every node input slot (a node reading a name twice counts twice), every
read from a nested graph (If/Loop/Scan bodies may read outer-scope tensors), and every graph output. The index is a
snapshot: a caller that rewires nodes asks only about tensors its edits did not touch (the rewrite asks about the
output of the layer it is working on, written after every node it has already replaced), or builds a new index.
"""

from __future__ import annotations

from collections import Counter

import onnx

__all__ = ["TensorReaders", "nested_reads"]


def nested_reads(graph: onnx.GraphProto) -> Counter:
    """Names read by nodes of nested graphs, at any depth."""
    reads = Counter()
    for node in graph.node:
        for attr in node.attribute:
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                for inner in sub.node:
                    reads.update(name for name in inner.input if name)
                reads.update(nested_reads(sub))
    return reads


class TensorReaders(Counter):
    """A Counter of reads per tensor name (node slots, nested graphs, graph outputs) that also knows which nodes of
    the main graph read each name (`nodes(name)`: indices in graph order, each node once)."""

    def __init__(self, graph: onnx.GraphProto):
        super().__init__()
        self._nodes: dict[str, list[int]] = {}
        for index, node in enumerate(graph.node):
            for name in node.input:
                if not name:
                    continue
                self[name] += 1
                readers = self._nodes.setdefault(name, [])
                if not readers or readers[-1] != index:
                    readers.append(index)
        self.update(nested_reads(graph))
        self.update(out.name for out in graph.output)

    def nodes(self, name: str) -> list[int]:
        """Indices of the main-graph nodes that read `name`."""
        return self._nodes.get(name, [])

    def only_reader(self, name: str) -> int | None:
        """The one node that reads `name`, if nothing else does (no graph output, nested graph or second slot)."""
        readers = self._nodes.get(name, [])
        return readers[0] if len(readers) == 1 and self[name] == 1 else None
