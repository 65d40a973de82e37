"""Per-layer benchmark of ctprune's SparseConv CPU kernel against onnxruntime's dense Conv / Gemm on the masked weights.

    python -m ctprune.lab.bench_layers --sparse                 # 1x1 and FC shapes at 2x..16x, 1 thread, batch 1
    python -m ctprune.lab.bench_layers --sparse --threads 1 2 --blocks 1 4 8
    python -m ctprune.lab.bench_layers --sparse --kinds general   # kxk, grouped and strided Convs (the general path)
    python -m ctprune.lab.bench_layers --sparse --kinds depthwise --baseline OTHER.so   # depthwise, two builds (A/B)
    python -m ctprune.lab.bench_layers --sparse --node-times      # also each op's own node time (node_times.py)

Both models run in the same process, same thread count, same input; timing alternates blocks of runs between the two
sessions and reports medians (bench_layers._time_pair). Layers are built by ctprune.lab.layer_model (random block
masks, the same builder the tests use). "ratio" is dense weights / kept weights.
"""

from __future__ import annotations

import statistics

import numpy as np

# 1x1 stride-1 Convs of MobileNetV2 (224x224 input) and ResNet-50: (C in, O out, H = W).
POINTWISE = [
    (32, 16, 112), (16, 96, 112), (96, 24, 56), (24, 144, 56), (144, 32, 28), (32, 192, 28), (192, 64, 14),
    (64, 384, 14), (384, 96, 14), (96, 576, 14), (576, 160, 7), (160, 960, 7), (960, 320, 7), (320, 1280, 7),
    (64, 256, 56), (256, 64, 56), (128, 512, 28), (512, 128, 28), (256, 1024, 14), (1024, 256, 14), (512, 2048, 7),
    (2048, 512, 7),
]
FC = [(4096, 25088), (4096, 4096), (1000, 1280)]  # (O, I)
# The general path (packed, shifted taps): (label, weight shape, input shape, geometry). Grouped 3x3 as in ResNeXt /
# RegNet, 5x5 and 1x7 / 7x1 as in Inception, strided 1x1 (ResNet's downsampling shortcut) and a strided 3x3.
GENERAL = [
    ("3x3 g4", (128, 32, 3, 3), (1, 128, 28, 28), dict(group=4, pads=(1, 1, 1, 1))),
    ("3x3 g8", (256, 32, 3, 3), (1, 256, 14, 14), dict(group=8, pads=(1, 1, 1, 1))),
    ("5x5", (64, 64, 5, 5), (1, 64, 28, 28), dict(pads=(2, 2, 2, 2))),
    ("1x7", (128, 128, 1, 7), (1, 128, 17, 17), dict(pads=(0, 3, 0, 3))),
    ("7x1", (128, 128, 7, 1), (1, 128, 17, 17), dict(pads=(3, 0, 3, 0))),
    ("1x1 s2", (512, 256, 1, 1), (1, 256, 56, 56), dict(strides=(2, 2))),
    ("1x1 s2", (1024, 512, 1, 1), (1, 512, 28, 28), dict(strides=(2, 2))),
    ("3x3 s2", (128, 64, 3, 3), (1, 64, 56, 56), dict(strides=(2, 2), pads=(1, 1, 1, 1))),
]
# Depthwise Convs (every weight kept; the rewriter moves them to SparseConv between pruned layers, depthwise.py):
# (C, H = W, stride, k). MobileNetV2 at 224x224, its 7x7 stage and the same at the examples' 28x28 scale, and 5x5
# ones as in EfficientNet / PP-LCNet. onnxruntime's Conv alone runs in NCHWc with its two reorders, as it does between
# two SparseConvs.
DEPTHWISE = [
    (32, 112, 1, 3), (96, 112, 2, 3), (144, 56, 1, 3), (144, 56, 2, 3), (192, 28, 1, 3), (192, 28, 2, 3),
    (384, 14, 1, 3), (576, 14, 1, 3), (576, 14, 2, 3), (960, 7, 1, 3), (192, 7, 1, 3), (384, 7, 1, 3),
    (576, 7, 1, 3), (144, 14, 2, 3), (240, 14, 1, 5), (672, 14, 2, 5), (480, 7, 1, 5), (1152, 7, 1, 5),
]
RATIOS = [2.0, 4.0, 8.0, 16.0]


def bench_sparse_layer(kind, shape, ratio, block, batch, threads, library, rng, runs=40, block_runs=5,
                       node_times=False, baseline=None):
    """node_times: also each op's own node time, from profiled sessions in the same alternation (node_times.py);
    baseline: another build of the library, timed on the same layer (A/B)."""
    from ctprune.lab.bench_layers import WARMUP_RUNS, _time_pair, session
    from ctprune.lab.layer_model import sparse_and_dense_models

    geometry = {}
    if kind == "fc":
        O, I = shape
        weight_shape, x_shape, macs = (O, I), (batch, I), O * I * batch
    elif kind == "general":
        _, weight_shape, x_shape, geometry = shape
        x_shape = (batch,) + tuple(x_shape[1:])
        sh, sw = geometry.get("strides", (1, 1))
        pt, pl, pb, pr = geometry.get("pads", (0, 0, 0, 0))
        oh = (x_shape[2] + pt + pb - weight_shape[2]) // sh + 1
        ow = (x_shape[3] + pl + pr - weight_shape[3]) // sw + 1
        macs = int(np.prod(weight_shape)) * oh * ow * batch
    elif kind == "depthwise":
        C, H, stride, k = shape
        weight_shape, x_shape = (C, 1, k, k), (batch, C, H, H)
        geometry = dict(group=C, strides=(stride, stride), pads=(k // 2,) * 4)
        macs = C * k * k * ((H + 2 * (k // 2) - k) // stride + 1) ** 2 * batch
    else:
        C, O, H = shape
        weight_shape, x_shape, macs = (O, C, 1, 1), (batch, C, H, H), O * C * H * H * batch
    sparse, dense, compact = sparse_and_dense_models(rng, weight_shape, x_shape, 1.0 / ratio, block, function=False,
                                                     **geometry)
    x = rng.standard_normal(x_shape).astype(np.float32)
    sessions = [session(dense, threads), session(sparse, threads, library)]
    if baseline:
        sessions.append(session(sparse, threads, baseline))
    if node_times:
        sessions += [session(dense, threads, profile=True), session(sparse, threads, library, profile=True)]
    timed = _time_pair(sessions, x, runs, block_runs)
    (t_dense, best_dense), (t_sparse, best_sparse) = timed[:2]
    kept = compact.kept
    row = dict(kind=kind, shape=shape, ratio=ratio, achieved=np.prod(weight_shape) / max(1, kept), block=block,
               batch=batch, threads=threads, dense_ms=t_dense * 1e3, sparse_ms=t_sparse * 1e3,
               speedup=t_dense / t_sparse, best_speedup=best_dense / best_sparse,
               dense_gflops=2.0 * macs / t_dense / 1e9, useful_gflops=2.0 * macs * kept / np.prod(weight_shape) / t_sparse / 1e9,
               bytes_per_weight=compact.stored_bytes() / max(1, kept))
    if baseline:
        row.update(baseline_ms=timed[2][0] * 1e3, baseline_speedup=t_dense / timed[2][0])
    if node_times:
        from ctprune.lab.node_times import node_columns

        row.update(node_columns(*sessions[-2:], skip=WARMUP_RUNS))
    return row


def render(rows) -> str:
    from ctprune.lab import node_times

    nodes = bool(rows) and "node_speedup" in rows[0]
    baseline = bool(rows) and "baseline_ms" in rows[0]
    head = ("| layer | shape | ratio | block | threads | dense ms | SparseConv ms | speedup | best-of speedup | "
            "dense GFLOP/s | useful GFLOP/s | bytes / kept weight |")
    head += " baseline library ms | its speedup |" if baseline else ""
    head += node_times.header("SparseConv") if nodes else ""
    lines = [head, "|" + "---|" * head[1:].count("|")]
    for r in rows:
        if r["kind"] == "conv1x1":
            shape = f"C{r['shape'][0]} O{r['shape'][1]} {r['shape'][2]}x{r['shape'][2]}"
        elif r["kind"] == "general":
            label, ws, xs, _ = r["shape"]
            shape = f"{label} C{xs[1]} O{ws[0]} {xs[2]}x{xs[3]}"
        elif r["kind"] == "depthwise":
            c, h, stride, k = r["shape"]
            shape = f"C{c} {h}x{h} s{stride} k{k}"
        else:
            shape = f"{r['shape'][0]}x{r['shape'][1]}"
        lines.append(f"| {r['kind']} | {shape} | {r['ratio']:g}x | {r['block']} | {r['threads']} | {r['dense_ms']:.3f} | "
                     f"{r['sparse_ms']:.3f} | {r['speedup']:.2f}x | {r['best_speedup']:.2f}x | "
                     f"{r['dense_gflops']:.1f} | {r['useful_gflops']:.1f} | {r['bytes_per_weight']:.2f} |"
                     + (f" {r['baseline_ms']:.3f} | {r['baseline_speedup']:.2f}x |" if baseline else "")
                     + (node_times.cells(r) if nodes else ""))
    return "\n".join(lines)


def summary(rows) -> str:
    lines = ["| layer | ratio | block | threads | median speedup | min | max | break-even (layers faster) |",
             "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["kind"], r["ratio"], r["block"], r["threads"]) for r in rows})
    for kind, ratio, block, threads in keys:
        sel = [r for r in rows if (r["kind"], r["ratio"], r["block"], r["threads"]) == (kind, ratio, block, threads)]
        v = [r["speedup"] for r in sel]
        faster = sum(1 for s in v if s > 1.0)
        lines.append(f"| {kind} | {ratio:g}x | {block} | {threads} | {statistics.median(v):.2f}x | {min(v):.2f}x | "
                     f"{max(v):.2f}x | {faster}/{len(v)} |")
    if rows and "node_speedup" in rows[0]:
        from ctprune.lab.bench_layers import node_summary

        lines += ["", node_summary(rows, ["kind", "ratio", "block", "threads"])]
    return "\n".join(lines)


def main_sparse(args) -> int:
    from tqdm import tqdm

    from ctprune.lab.bench_layers import NODE_TIME_RUNS
    from ctprune.runtime import kernel_library_path

    library = kernel_library_path()
    rng = np.random.default_rng(args.seed)
    runs = args.runs or (NODE_TIME_RUNS if args.node_times else 20 if args.quick else 40)
    ratios = args.ratios if args.ratios != [2.25, 4.0, 8.0, 16.0] else RATIOS
    cases = []
    for t in args.threads:
        if "depthwise" in args.kinds:  # every weight kept: no ratio or block to vary
            cases += [("depthwise", s, 1.0, 1, t) for s in DEPTHWISE]
        for b in args.blocks:
            for r in ratios:
                if "conv" in args.kinds:
                    cases += [("conv1x1", s, r, b, t) for s in POINTWISE]
                if "general" in args.kinds:
                    cases += [("general", s, r, b, t) for s in GENERAL]
                if "fc" in args.kinds:
                    cases += [("fc", s, r, b, t) for s in FC]
    rows = []
    for kind, shape, r, b, t in tqdm(cases, desc="layers", unit="layer"):
        fc_runs = max(10, runs // 2) if kind == "fc" and shape[1] > 5000 else runs
        rows.append(bench_sparse_layer(kind, shape, r, b, 1, t, library, rng, runs=fc_runs, node_times=args.node_times,
                                       baseline=args.baseline))
    print(render(rows))
    print()
    print(summary(rows))
    return 0
