"""Per-layer benchmark of ctprune's PatternConv CPU kernel against onnxruntime's dense Conv on the masked weights.

    python -m ctprune.lab.bench_layers            # the full table (minutes)
    python -m ctprune.lab.bench_layers --quick    # batch 1, fewer runs
    python -m ctprune.lab.bench_layers --sparse   # SparseConv: 1x1 and FC layers (ctprune/lab/bench_sparse.py)

Both models run in the same process with the same thread count and the same input; timing alternates blocks of runs
between the two sessions and reports medians, so drift on a shared machine hits both alike. "GFLOP/s" counts only the
multiply-adds PatternConv keeps (4 per kept kernel per output pixel), i.e. the useful work.

The layers and their models come from ctprune/lab/layer_model.py, the one builder the kernel tests use too.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx

from ctprune.lab.layer_model import (  # bench_cuda imports the last two from here too
    dense_conv_model,
    kept_per_filter_for_ratio,
    pattern_conv_model,
    random_pattern_layer,
)

# 3x3 layers of ResNet/VGG at CIFAR and ImageNet resolutions: (channels in = out, height = width).
LAYER_SET = [(64, 56), (64, 32), (128, 28), (128, 16), (256, 14), (256, 8), (512, 7), (512, 4)]
RATIOS = [2.25, 4.0, 8.0, 16.0]


def session(model: onnx.ModelProto, threads: int, library: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if library:
        so.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _time_pair(sessions, x, runs, block):
    """(median, best) seconds per run of each session, alternating blocks of `block` runs."""
    feeds = {"X": x}
    for s in sessions:  # warm-up: first runs allocate and tune
        for _ in range(3):
            s.run(None, feeds)
    times = [[] for _ in sessions]
    for _ in range(max(1, runs // block)):
        for i, s in enumerate(sessions):
            for _ in range(block):
                t0 = time.perf_counter()
                s.run(None, feeds)
                times[i].append(time.perf_counter() - t0)
    return [(statistics.median(t), min(t)) for t in times]


def bench_layer(channels, size, ratio, batch, threads, library, rng, runs=40, block=5):
    layer = random_pattern_layer(rng, channels, channels, kept_per_filter_for_ratio(channels, ratio))
    x_shape = (batch, channels, size, size)
    x = rng.standard_normal(x_shape).astype(np.float32)
    dense = session(dense_conv_model(layer, x_shape), threads)
    pattern = session(pattern_conv_model(layer, x_shape), threads, library)
    (t_dense, best_dense), (t_pattern, best_pattern) = _time_pair([dense, pattern], x, runs, block)
    useful_flops = 2.0 * 4 * layer.kept_kernels * size * size * batch
    dense_weights = channels * channels * 9
    return dict(C=channels, H=size, ratio=ratio, achieved=dense_weights / (4 * layer.kept_kernels), batch=batch,
                threads=threads, dense_ms=t_dense * 1e3, pattern_ms=t_pattern * 1e3, speedup=t_dense / t_pattern,
                best_dense_ms=best_dense * 1e3, best_pattern_ms=best_pattern * 1e3, best_speedup=best_dense / best_pattern,
                gflops=useful_flops / t_pattern / 1e9, dense_gflops=2.0 * dense_weights * size * size * batch / t_dense / 1e9)


def render(rows) -> str:
    lines = ["| C=O | H=W | ratio | batch | threads | dense ms | PatternConv ms | speedup | best dense ms | "
             "best PatternConv ms | best-of speedup | useful GFLOP/s | dense GFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['C']} | {r['H']} | {r['ratio']:g}x | {r['batch']} | {r['threads']} | {r['dense_ms']:.3f} | "
                     f"{r['pattern_ms']:.3f} | {r['speedup']:.2f}x | {r['best_dense_ms']:.3f} | "
                     f"{r['best_pattern_ms']:.3f} | {r['best_speedup']:.2f}x | {r['gflops']:.1f} | {r['dense_gflops']:.1f} |")
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
    return median_summary(rows, ["ratio", "batch", "threads"], "speedup", "best_speedup",
                          ["ratio", "batch", "threads", "median speedup", "min", "max", "median best-of speedup"])


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
    parser.add_argument("--kinds", nargs="+", default=["conv", "fc"], choices=["conv", "fc", "general"], help="--sparse: layers")
    args = parser.parse_args(argv)
    if args.sparse:
        from ctprune.lab.bench_sparse import main_sparse

        return main_sparse(args)

    from tqdm import tqdm

    from ctprune.runtime import kernel_library_path

    library = kernel_library_path()
    batches = args.batch or ([1] if args.quick else [1, 8])
    runs = args.runs or (20 if args.quick else 60)
    rng = np.random.default_rng(args.seed)
    cases = [(c, h, r, b, t) for t in args.threads for b in batches for r in args.ratios for c, h in LAYER_SET]
    rows = []
    for c, h, r, b, t in tqdm(cases, desc="layers", unit="layer"):
        rows.append(bench_layer(c, h, r, b, t, library, rng, runs=runs if b == 1 else max(10, runs // 4)))
    print(render(rows))
    print()
    print(summary(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
