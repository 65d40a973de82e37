"""What onnxruntime's default optimisation does around ctprune's ops, and what it costs (issue 16, item 3).

    python -m ctprune.lab.ort_layout MODEL.onnx [MORE.onnx ...] [--repeats 15] [--threads 1]

Per model: the node counts of the graph onnxruntime runs at its default level (ORT_ENABLE_ALL: dense Convs and pools
become its NCHWc kernels, with ReorderInput / ReorderOutput where they meet ops that read NCHW, like PatternConv),
then the latency at that level, with the NCHWc transformer disabled, and at ORT_ENABLE_EXTENDED (no layout change),
alternating in one process: medians and best-of.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ctprune.runtime.session import register_kernels

LEVELS = {
    "default": (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, None),
    "no NCHWc": (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ["NchwcTransformer"]),
    "extended": (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, None),
}


def session(path: str, level, disabled=None, threads: int = 1, dump: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = level
    if dump:
        so.optimized_model_filepath = dump
    register_kernels(so)
    extra = {"disabled_optimizers": disabled} if disabled else {}
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"], **extra)


def optimised_ops(path: str) -> collections.Counter:
    """Node counts (domain-qualified outside the default domain) of the graph onnxruntime runs by default."""
    with tempfile.TemporaryDirectory() as tmp:
        dump = str(Path(tmp) / "optimised.onnx")
        session(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, dump=dump)
        graph = onnx.load(dump, load_external_data=False).graph
    return collections.Counter((f"{n.domain}." if n.domain not in ("", "ai.onnx") else "") + n.op_type
                               for n in graph.node)


def latencies(path: str, repeats: int, threads: int) -> dict[str, list[float]]:
    sessions = {name: session(path, level, disabled, threads) for name, (level, disabled) in LEVELS.items()}
    first = next(iter(sessions.values())).get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in first.shape]
    feed = {first.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    for s in sessions.values():
        s.run(None, feed)
    times = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feed)
            times[name].append(time.perf_counter() - start)
    return times


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    for path in args.models:
        ops = optimised_ops(path)
        reorders = {k: v for k, v in ops.items() if "Reorder" in k}
        print(f"{path}\n  optimised graph: {dict(ops)}\n  reorders: {reorders or 'none'}")
        for name, t in latencies(path, args.repeats, args.threads).items():
            print(f"  {name:9s} median {1e3 * statistics.median(t):9.3f} ms   best {1e3 * min(t):9.3f} ms")


if __name__ == "__main__":
    main()
