"""Per-node kernel times from onnxruntime's profiler, for the per-layer benchmark's --node-times mode.

    python -m ctprune.lab.bench_layers --sparse --quick --ratios 8 --kinds conv --threads 1 --node-times

A session.run call costs 5-17 us of onnxruntime and Python around the kernel for either contender, and a lone dense
Conv runs as NCHWc between a ReorderInput and a ReorderOutput that a dense model would not have between its Convs; the
session-level ratio includes both. Here each contender also runs in a second session with profiling on, in the same
alternation as the session-level timing (bench_layers._time_pair), and the profile gives each node's own time: the
dense op's node (Conv, FusedConv or Gemm), the reorders around it (their own column, summed per run), and the ctprune
op's node. Medians over the timed runs, the warm-up runs dropped. The session-level columns still come from the
unprofiled sessions: the profiler adds 25-60 us per run outside the nodes (1x1 layers, 1 thread). The profiler records
whole microseconds, so a median of a 30 us node moves in ~3% steps: use 200+ runs (the mode's default).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import uuid
from typing import NamedTuple

DENSE_OPS = {"Conv", "FusedConv", "Gemm"}
CTPRUNE_OPS = {"PatternConv", "SparseConv"}
REORDER_OPS = {"ReorderInput", "ReorderOutput"}


class NodeTimes(NamedTuple):
    op: str  # the op type (args.op_name): "Conv" for the NCHWc Conv too
    us: list[int]  # one duration per run, in the order the runs happened


def profile_prefix() -> str:
    """A profile file prefix no other session shares (onnxruntime only appends a timestamp in milliseconds)."""
    return os.path.join(tempfile.gettempdir(), f"ctprune_node_times_{uuid.uuid4().hex}")


def node_times(session, skip: int = 0) -> dict[str, NodeTimes]:
    """Ends the profiling of a session created with SessionOptions.enable_profiling and returns {node name:
    NodeTimes} from its "<node>_kernel_time" events, without each node's first `skip` runs (the warm-up)."""
    path = session.end_profiling()
    try:
        with open(path) as f:
            events = json.load(f)
    finally:
        os.remove(path)
    nodes: dict[str, NodeTimes] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            name = event["name"][: -len("_kernel_time")]
            nodes.setdefault(name, NodeTimes(event["args"]["op_name"], [])).us.append(int(event["dur"]))
    return {name: NodeTimes(t.op, t.us[skip:]) for name, t in nodes.items()}


def _the_node(nodes: dict[str, NodeTimes], ops: set[str], allowed_others: set[str]) -> tuple[NodeTimes, list[int]]:
    """The one node whose op is in `ops`, and the per-run sum of the other nodes' times (every one's op must be in
    `allowed_others`: a node this mode does not know raises instead of going uncounted)."""
    main = [t for t in nodes.values() if t.op in ops]
    others = [t for t in nodes.values() if t.op not in ops]
    unknown = sorted({t.op for t in others} - allowed_others)
    if len(main) != 1 or unknown:
        raise ValueError(f"expected one node of {sorted(ops)} and only {sorted(allowed_others)} besides it, "
                         f"got {sorted((name, t.op) for name, t in nodes.items())}")
    runs = len(main[0].us)
    if any(len(t.us) != runs for t in others):
        raise ValueError(f"nodes ran different numbers of times: {[(t.op, len(t.us)) for t in nodes.values()]}")
    return main[0], [sum(t.us[i] for t in others) for i in range(runs)]


def node_columns(dense_session, op_session, skip: int) -> dict:
    """The row entries of --node-times from the two profiled sessions (ending their profiling): medians in us of the
    dense op's node, of its reorders (0 for Gemm), of the ctprune op's node, and dense node / ctprune node."""
    dense, reorders = _the_node(node_times(dense_session, skip), DENSE_OPS, REORDER_OPS)
    op, _ = _the_node(node_times(op_session, skip), CTPRUNE_OPS, set())
    dense_us, op_us = statistics.median(dense.us), statistics.median(op.us)
    return dict(dense_node_us=dense_us, reorder_us=statistics.median(reorders), op_node_us=op_us,
                node_speedup=dense_us / op_us if op_us else math.inf, node_runs=len(op.us))


def header(op: str) -> str:
    """The table columns --node-times adds, `op` naming the ctprune op."""
    return f" dense node us | dense reorders us | {op} node us | node speedup |"


def cells(row: dict) -> str:
    return (f" {row['dense_node_us']:g} | {row['reorder_us']:g} | {row['op_node_us']:g} | "
            f"{row['node_speedup']:.2f}x |")
