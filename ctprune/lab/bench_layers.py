"""Per-layer benchmark of ctprune's PatternConv CPU kernel against onnxruntime's dense Conv on the masked weights.

    python -m ctprune.lab.bench_layers            # the full table (minutes)
    python -m ctprune.lab.bench_layers --quick    # batch 1, fewer runs
    python -m ctprune.lab.bench_layers --sparse   # SparseConv: 1x1 and FC layers (ctprune/lab/bench_sparse.py)

Both models run in the same process with the same thread count and the same input; timing alternates blocks of runs
between the two sessions and reports medians, so drift on a shared machine hits both alike. "GFLOP/s" counts only the
multiply-adds PatternConv keeps (4 per kept kernel per output pixel), i.e. the useful work.

The layer builders here (`random_pattern_layer`, `pattern_conv_model`, `dense_conv_model`) are also what the kernel
tests use to make single-node models.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

DOMAIN = "ai.ctprune"
ALL_SHAPES = list(itertools.combinations(range(9), 4))  # the 126 4-of-9 tap sets
# 3x3 layers of ResNet/VGG at CIFAR and ImageNet resolutions: (channels in = out, height = width).
LAYER_SET = [(64, 56), (64, 32), (128, 28), (128, 16), (256, 14), (256, 8), (512, 7), (512, 4)]
RATIOS = [2.25, 4.0, 8.0, 16.0]


@dataclass
class PatternLayer:
    """A pruned 3x3 layer in PatternConv's storage order (ops/PatternConv.md) and as the dense masked weight."""

    patterns: np.ndarray  # (P, 4) int64
    kernel_filters: np.ndarray  # (K,) int64
    kernel_channels: np.ndarray
    kernel_patterns: np.ndarray
    weights: np.ndarray  # (K, 4) float32
    dense: np.ndarray  # (O, C, 3, 3) float32, zero where pruned

    @property
    def kept_kernels(self) -> int:
        return len(self.kernel_filters)


def random_pattern_layer(rng, out_channels, in_channels, kept_per_filter, library_size=8) -> PatternLayer:
    """A layer whose filter f keeps `kept_per_filter[f]` random input channels (an int applies to all filters), each
    with a random pattern from a random library of `library_size` distinct 4-of-9 shapes (all used when possible)."""
    counts = np.broadcast_to(np.asarray(kept_per_filter, dtype=np.int64), (out_channels,))
    library = np.array([ALL_SHAPES[i] for i in rng.choice(len(ALL_SHAPES), library_size, replace=False)], np.int64)
    total = int(counts.sum())
    pattern_ids = rng.integers(0, library_size, total)
    pattern_ids[: min(total, library_size)] = np.arange(min(total, library_size))
    pattern_ids = rng.permutation(pattern_ids)

    rows, i = [], 0
    for f in np.argsort(-counts, kind="stable"):  # filters by decreasing work
        channels = rng.choice(in_channels, int(counts[f]), replace=False)
        ids = pattern_ids[i : i + len(channels)]
        i += len(channels)
        rows += sorted((int(p), int(c), int(f)) for p, c in zip(ids, channels))
    kernel_patterns = np.array([r[0] for r in rows], np.int64)
    kernel_channels = np.array([r[1] for r in rows], np.int64)
    kernel_filters = np.array([r[2] for r in rows], np.int64)
    weights = rng.standard_normal((len(rows), 4)).astype(np.float32)

    dense = np.zeros((out_channels, in_channels, 9), np.float32)
    for k in range(len(rows)):
        dense[kernel_filters[k], kernel_channels[k], library[kernel_patterns[k]]] = weights[k]
    return PatternLayer(library, kernel_filters, kernel_channels, kernel_patterns, weights,
                        dense.reshape(out_channels, in_channels, 3, 3))


def kept_per_filter_for_ratio(in_channels: int, ratio: float) -> int:
    """Kernels a filter keeps so that 9*C dense weights / (4 * kept) is about `ratio` (2.25 keeps every kernel)."""
    return max(1, min(in_channels, round(in_channels * 9 / 4 / ratio)))


def _model(nodes, initializers, x_shape, opsets, z_shape=None) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, None if x_shape is None else list(x_shape))]
    if z_shape is not None:
        inputs.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, list(z_shape)))
    graph = helper.make_graph(nodes, "layer", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 8
    return model


def pattern_conv_model(layer: PatternLayer, x_shape, bias=None, strides=(1, 1), pads=(1, 1, 1, 1),
                       activation=(-math.inf, math.inf), z_shape=None, **overrides) -> onnx.ModelProto:
    """One PatternConv node (no reference function: it needs ctprune's library). `overrides` replace attributes.
    z_shape: the residual Z becomes a graph input of that shape."""
    O, C = layer.dense.shape[:2]
    attrs = dict(weight_shape=[O, C, 3, 3], patterns=layer.patterns.ravel().tolist(),
                 kernel_filters=layer.kernel_filters.tolist(), kernel_channels=layer.kernel_channels.tolist(),
                 kernel_patterns=layer.kernel_patterns.tolist(), strides=list(strides), pads=list(pads),
                 dilations=[1, 1], group=1, activation_min=float(activation[0]), activation_max=float(activation[1]))
    attrs.update(overrides)
    inits = [onnx.numpy_helper.from_array(layer.weights, "W")]
    inputs = ["X", "W"]
    if bias is not None:
        inits.append(onnx.numpy_helper.from_array(np.asarray(bias, np.float32), "B"))
        inputs.append("B")
    if z_shape is not None:
        inputs += [""] * (3 - len(inputs)) + ["Z"]
    node = helper.make_node("PatternConv", inputs, ["Y"], domain=DOMAIN)
    for key, value in attrs.items():  # typed explicitly: a filter list may be empty (every kernel removed)
        kind = onnx.AttributeProto.INTS if isinstance(value, list) else None
        node.attribute.append(helper.make_attribute(key, value, attr_type=kind))
    return _model([node], inits, x_shape, [("", 17), (DOMAIN, 1)], z_shape)


def dense_conv_model(layer: PatternLayer, x_shape, bias=None, strides=(1, 1), pads=(1, 1, 1, 1),
                     activation=(-math.inf, math.inf)) -> onnx.ModelProto:
    """onnxruntime's Conv on the masked dense weight, followed by Clip when there is an activation."""
    inits = [onnx.numpy_helper.from_array(layer.dense, "Wd")]
    inputs = ["X", "Wd"]
    if bias is not None:
        inits.append(onnx.numpy_helper.from_array(np.asarray(bias, np.float32), "B"))
        inputs.append("B")
    lo, hi = activation
    clip = not (math.isinf(lo) and lo < 0 and math.isinf(hi) and hi > 0)
    nodes = [helper.make_node("Conv", inputs, ["Yc" if clip else "Y"], kernel_shape=[3, 3], strides=list(strides),
                              pads=list(pads))]
    if clip:
        inits += [onnx.numpy_helper.from_array(np.array(v, np.float32), n)
                  for v, n in ((max(lo, -3.4e38), "lo"), (min(hi, 3.4e38), "hi"))]
        nodes.append(helper.make_node("Clip", ["Yc", "lo", "hi"], ["Y"]))
    return _model(nodes, inits, x_shape, [("", 17)])


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
    parser.add_argument("--kinds", nargs="+", default=["conv", "fc"], choices=["conv", "fc"], help="--sparse: layers")
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
