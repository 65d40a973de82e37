"""Per-layer benchmark of ctprune's PatternConv CPU kernel against onnxruntime's dense Conv on the masked weights.

    python -m ctprune.lab.bench_layers            # the full table (minutes)
    python -m ctprune.lab.bench_layers --quick    # batch 1, fewer runs
    python -m ctprune.lab.bench_layers --sparse   # SparseConv: 1x1 and FC layers (ctprune/lab/bench_sparse.py)
    python -m ctprune.lab.bench_layers --block 16 --ratios 2.25 4 8 --threads 1 --batch 1   # filter-block layers
    python -m ctprune.lab.bench_layers --baseline OTHER.so ...   # also time another build of the library (A/B)
    python -m ctprune.lab.bench_layers --node-times ...   # also each op's own node time (ctprune/lab/node_times.py)
    python -m ctprune.lab.bench_layers --one-session --threads 2 ...   # one session alive at a time (see ONE_SESSION)

--block N draws block-structured layers (runs of N filters keep the same channels with the same patterns: the CPU
kernel computes them 16 at a time) on the kernel lab's six layers unless --layers says otherwise, and also times the
same layer with the block path off (CTPRUNE_PATTERN_BLOCKS=0: every filter one at a time) in the same alternation.

Both models run in the same process with the same thread count and the same input; timing alternates blocks of runs
between the two sessions and reports medians, so drift on a shared machine hits both alike. "GFLOP/s" counts only the
multiply-adds PatternConv keeps (4 per kept kernel per output pixel), i.e. the useful work.

The layers and their models come from ctprune/lab/layer_model.py, the one builder the kernel tests use too.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import NamedTuple

import numpy as np
import onnx

from ctprune.lab.layer_model import (  # bench_cuda imports the last two from here too
    dense_conv_model,
    kept_per_filter_for_ratio,
    pattern_conv_model,
    random_pattern_layer,
)
from ctprune.runtime.bench import STOP_SPINNING_BETWEEN_RUNS

# 3x3 layers of ResNet/VGG at CIFAR and ImageNet resolutions: (channels in = out, height = width).
LAYER_SET = [(64, 56), (64, 32), (128, 28), (128, 16), (256, 14), (256, 8), (512, 7), (512, 4)]
BLOCK_LAYER_SET = [(64, 56), (128, 28), (256, 14), (512, 7), (512, 14), (256, 56)]  # the kernel lab's (issue 16)
RATIOS = [2.25, 4.0, 8.0, 16.0]
NODE_TIME_RUNS = 200  # --node-times: the profiler's times are whole microseconds


# --one-session: only one session exists at a time; each block of timed runs creates its session, warms it up and
# drops it. Every session has its own onnxruntime pool whose worker spins after a run, and on a 2-core machine the
# spinning worker of the session timed just before holds the second core: a two-thread contender then ran on one
# (BENCHMARKS.md, fourteenth session). Sessions now stop spinning when a run returns, which takes most of that away;
# two-thread PatternConv still ran at one-thread speed in some runs of this mode-less alternation, never alone.
ONE_SESSION = {"on": False}


class SessionRecipe(NamedTuple):
    """What session() returns under --one-session: the session, made when _time_pair needs it."""

    model: onnx.ModelProto
    threads: int
    library: str | None
    env: dict | None

    def make(self):
        return _make_session(self.model, self.threads, self.library, self.env)


def session(model: onnx.ModelProto, threads: int, library: str | None = None, env: dict | None = None,
            profile: bool = False):
    """env: environment variables set while the session (and so the kernel, which reads them) is created;
    profile: onnxruntime's profiler on (read with node_times.node_times)."""
    if ONE_SESSION["on"] and not profile:
        return SessionRecipe(model, threads, library, env)
    return _make_session(model, threads, library, env, profile)


def _make_session(model, threads, library=None, env=None, profile=False):
    import os

    import onnxruntime as ort

    if env:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return _make_session(model, threads, library, profile=profile)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry(STOP_SPINNING_BETWEEN_RUNS, "1")  # as ctprune bench does (runtime/bench.py)
    if library:
        so.register_custom_ops_library(library)
    if profile:
        from ctprune.lab.node_times import profile_prefix

        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix()
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


WARMUP_RUNS = 3


def _time_pair(sessions, x, runs, block):
    """(median, best) seconds per run of each session, alternating blocks of `block` runs after WARMUP_RUNS each. A
    SessionRecipe (--one-session) is made for each of its blocks, warmed up, and dropped after it."""
    import gc

    feeds = {"X": x}
    for s in sessions:  # warm-up: first runs allocate and tune
        if not isinstance(s, SessionRecipe):
            _warm_up(s, feeds)
    times = [[] for _ in sessions]
    for _ in range(max(1, runs // block)):
        for i, s in enumerate(sessions):
            live = s.make() if isinstance(s, SessionRecipe) else s
            if live is not s:
                _warm_up(live, feeds)
            for _ in range(block):
                t0 = time.perf_counter()
                live.run(None, feeds)
                times[i].append(time.perf_counter() - t0)
            if live is not s:
                del live
                gc.collect()  # the session's pool goes with it before the next one starts
    return [(statistics.median(t), min(t)) for t in times]


def _warm_up(session, feeds) -> None:
    for _ in range(WARMUP_RUNS):
        session.run(None, feeds)


def bench_layer(channels, size, ratio, batch, threads, library, rng, runs=40, block=5, filter_block=None,
                baseline=None, node_times=False):
    """filter_block: block-structured layer (runs of that many filters share channels and patterns), also timed with
    the block path off ("per_filter_*"); baseline: another build of the library, timed on the same layer;
    node_times: also each op's own node time, from profiled sessions in the same alternation (node_times.py)."""
    layer = random_pattern_layer(rng, channels, channels, kept_per_filter_for_ratio(channels, ratio),
                                 block=filter_block)
    x_shape = (batch, channels, size, size)
    x = rng.standard_normal(x_shape).astype(np.float32)
    model, dense_model = pattern_conv_model(layer, x_shape), dense_conv_model(layer, x_shape)
    sessions = {"dense": session(dense_model, threads), "pattern": session(model, threads, library)}
    if filter_block:
        sessions["per_filter"] = session(model, threads, library, env={"CTPRUNE_PATTERN_BLOCKS": "0"})
    if baseline:
        sessions["baseline"] = session(model, threads, baseline)
    if node_times:
        sessions["dense_nodes"] = session(dense_model, threads, profile=True)
        sessions["pattern_nodes"] = session(model, threads, library, profile=True)
    timed = dict(zip(sessions, _time_pair(list(sessions.values()), x, runs, block)))
    (t_dense, best_dense), (t_pattern, best_pattern) = timed["dense"], timed["pattern"]
    useful_flops = 2.0 * 4 * layer.kept_kernels * size * size * batch
    dense_weights = channels * channels * 9
    row = dict(C=channels, H=size, ratio=ratio, achieved=dense_weights / (4 * layer.kept_kernels), batch=batch,
               threads=threads, dense_ms=t_dense * 1e3, pattern_ms=t_pattern * 1e3, speedup=t_dense / t_pattern,
               best_dense_ms=best_dense * 1e3, best_pattern_ms=best_pattern * 1e3, best_speedup=best_dense / best_pattern,
               gflops=useful_flops / t_pattern / 1e9, dense_gflops=2.0 * dense_weights * size * size * batch / t_dense / 1e9)
    for name in ("per_filter", "baseline"):
        if name in timed:
            t, best = timed[name]
            row.update({f"{name}_ms": t * 1e3, f"{name}_speedup": t_dense / t, f"best_{name}_speedup": best_dense / best})
    if node_times:
        from ctprune.lab.node_times import node_columns

        row.update(node_columns(sessions["dense_nodes"], sessions["pattern_nodes"], skip=WARMUP_RUNS))
    return row


EXTRA_COLUMNS = {"per_filter": "block path off", "baseline": "baseline library"}


def render(rows) -> str:
    from ctprune.lab import node_times

    extra = [name for name in EXTRA_COLUMNS if rows and f"{name}_ms" in rows[0]]
    nodes = bool(rows) and "node_speedup" in rows[0]
    head = ("| C=O | H=W | ratio | batch | threads | dense ms | PatternConv ms | speedup | best dense ms | "
            "best PatternConv ms | best-of speedup | useful GFLOP/s | dense GFLOP/s |")
    for name in extra:
        head += f" {EXTRA_COLUMNS[name]} ms | {EXTRA_COLUMNS[name]} speedup |"
    if nodes:
        head += node_times.header("PatternConv")
    lines = [head, "|" + "---|" * head[1:].count("|")]
    for r in rows:
        line = (f"| {r['C']} | {r['H']} | {r['ratio']:g}x | {r['batch']} | {r['threads']} | {r['dense_ms']:.3f} | "
                f"{r['pattern_ms']:.3f} | {r['speedup']:.2f}x | {r['best_dense_ms']:.3f} | "
                f"{r['best_pattern_ms']:.3f} | {r['best_speedup']:.2f}x | {r['gflops']:.1f} | {r['dense_gflops']:.1f} |")
        for name in extra:
            line += f" {r[f'{name}_ms']:.3f} | {r[f'{name}_speedup']:.2f}x |"
        if nodes:
            line += node_times.cells(r)
        lines.append(line)
    return "\n".join(lines)


def median_summary(rows, group_by: list[str], value: str, also: str, headers: list[str]) -> str:
    """One markdown row per distinct `group_by` values: median, min and max of `value`, then the median of `also`.
    `headers`: the group columns' headers, then the four statistics' headers."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for key in sorted({tuple(r[k] for k in group_by) for r in rows}):
        sel = [r for r in rows if tuple(r[k] for k in group_by) == key]
        v = [r[value] for r in sel]
        cells = [f"{k:g}x" if name == "ratio" else str(k) for name, k in zip(group_by, key)]
        cells += [f"{statistics.median(v):.2f}x", f"{min(v):.2f}x", f"{max(v):.2f}x",
                  f"{statistics.median(r[also] for r in sel):.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows) -> str:
    text = median_summary(rows, ["ratio", "batch", "threads"], "speedup", "best_speedup",
                          ["ratio", "batch", "threads", "median speedup", "min", "max", "median best-of speedup"])
    for name, title in EXTRA_COLUMNS.items():
        if rows and f"{name}_ms" in rows[0]:
            text += f"\n\n{title}:\n\n" + median_summary(
                rows, ["ratio", "batch", "threads"], f"{name}_speedup", f"best_{name}_speedup",
                ["ratio", "batch", "threads", "median speedup", "min", "max", "median best-of speedup"])
    if rows and "node_speedup" in rows[0]:
        text += "\n\n" + node_summary(rows, ["ratio", "batch", "threads"])
    return text


def node_summary(rows, group_by: list[str]) -> str:
    """--node-times: the medians of the node-level ratio next to the session-level one."""
    return "node times (dense op's node / ctprune op's node; reorders excluded):\n\n" + median_summary(
        rows, group_by, "node_speedup", "speedup",
        group_by + ["median node speedup", "min", "max", "median session speedup"])


# Threads of this process's own libraries (numpy's OpenBLAS, torch's OpenMP) spin for a while after each call; with
# two-thread contenders on a 2-core machine they took the second core from onnxruntime's pool: PatternConv 128@28,
# 256@14 and 512@7 at 8x ran 0.42 ms instead of 0.21-0.26 ms on two threads (BENCHMARKS.md, fourteenth session).
QUIET_HELPERS = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def _rerun_with_quiet_helpers() -> None:
    """Start this command again with QUIET_HELPERS set (they are read when the libraries load, so only a new process
    takes them); nothing when they are set already."""
    import os
    import sys

    if all(os.environ.get(k) == v for k, v in QUIET_HELPERS.items()):
        return
    os.execve(sys.executable, [sys.executable, "-m", "ctprune.lab.bench_layers", *sys.argv[1:]],
              dict(os.environ, **QUIET_HELPERS))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 only, fewer runs")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="default: 1 and 8 (1 with --quick)")
    parser.add_argument("--ratios", type=float, nargs="+", default=RATIOS)
    parser.add_argument("--runs", type=int, default=None, help="timed runs per model and layer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sparse", action="store_true", help="SparseConv's 1x1 and FC shapes instead (bench_sparse.py)")
    parser.add_argument("--blocks", type=int, nargs="+", default=[4], help="--sparse: block sizes (FC: 8 unless given)")
    parser.add_argument("--kinds", nargs="+", default=["conv", "fc"], choices=["conv", "fc", "general", "depthwise"],
                        help="--sparse: layers")
    parser.add_argument("--block", type=int, default=None,
                        help="block-structured layers: runs of N filters share channels and patterns")
    parser.add_argument("--layers", nargs="+", default=None, help="CxH (C = O, H = W), e.g. 64x56 512x7")
    parser.add_argument("--baseline", default=None, help="another build of the library to time on the same layers")
    parser.add_argument("--node-times", action="store_true",
                        help="also each op's own node time from onnxruntime's profiler (default --runs 200)")
    parser.add_argument("--one-session", action="store_true",
                        help="one onnxruntime session alive at a time (two-thread timing on a 2-core machine)")
    args = parser.parse_args(argv)
    if args.one_session and args.node_times:
        parser.error("--one-session times sessions it drops; --node-times reads the profiles of kept ones")
    ONE_SESSION["on"] = args.one_session
    if argv is None and max(args.threads) > 1:  # the command line, timing several threads
        _rerun_with_quiet_helpers()
    if args.sparse:
        from ctprune.lab.bench_sparse import main_sparse

        return main_sparse(args)

    from tqdm import tqdm

    from ctprune.runtime import kernel_library_path

    library = kernel_library_path()
    batches = args.batch or ([1] if args.quick else [1, 8])
    runs = args.runs or (NODE_TIME_RUNS if args.node_times else 20 if args.quick else 60)
    rng = np.random.default_rng(args.seed)
    layer_set = ([tuple(int(v) for v in s.split("x")) for s in args.layers] if args.layers
                 else BLOCK_LAYER_SET if args.block else LAYER_SET)
    cases = [(c, h, r, b, t) for t in args.threads for b in batches for r in args.ratios for c, h in layer_set]
    rows = []
    for c, h, r, b, t in tqdm(cases, desc="layers", unit="layer"):
        rows.append(bench_layer(c, h, r, b, t, library, rng, runs=runs if b == 1 else max(10, runs // 4),
                                filter_block=args.block, baseline=args.baseline, node_times=args.node_times))
    print(render(rows))
    print()
    print(summary(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
