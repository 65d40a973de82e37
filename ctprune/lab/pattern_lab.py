"""PatternConv kernel lab (issue 16): inner-loop designs that reuse each load for several multiply-adds, against
onnxruntime's dense Conv on the same masked weights, in one process.

    python -m ctprune.lab.pattern_lab                  # 6 layers x 2.25x/4x/8x, 1 thread (a few minutes)
    python -m ctprune.lab.pattern_lab --threads 2 --ratios 8
    python -m ctprune.lab.pattern_lab --sharing        # design (b) only: how much random masks share

The designs are in csrc/lab/pattern_lab.cc (read its header), built here with g++ -O3 -mavx2 -mfma into a temporary
shared object and called through ctypes; the product library is not involved except as the "product" contender
(ctprune's PatternConv kernel inside onnxruntime, the tier this CPU picks and the AVX2 one).

Layers: 3x3, stride 1, pad 1, C = O, batch 1. For designs (a) and (c) the mask is drawn block-structured: filters in
blocks of 16 consecutive filters keep the same input channels with the same pattern (so blocks of 8 and 4 share too);
the weights themselves are random per filter. Design (b) takes an ordinary per-filter random mask (what ClickTrain
leaves today), reorders filters greedily so that a block of 8 shares as many (channel, tap) pairs as possible, and runs
the broadcast kernel on the union of the block's taps with zero weights where a filter lacks a tap: its useful rate
counts only the real taps.

Every design's output is checked against onnxruntime's dense Conv on the masked weight (and, for the first layer of
each run, a float64 numpy convolution). Timing alternates all contenders in blocks of `--block` runs; medians.
"useful GFLOP/s" counts 8 flops (4 multiply-adds) per kept kernel per output pixel.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import pathlib
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from ctprune.lab.bench_layers import session
from ctprune.lab.layer_model import ALL_PATTERNS, kept_per_filter_for_ratio
from ctprune.lab.layer_model import dense_conv_layer_model, pattern_conv_layer_model
from ctprune.rewrite.pattern_conv import LayerPatterns, compact_from_dense

SOURCE = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "lab" / "pattern_lab.cc"
LAYERS = [(64, 56), (128, 28), (256, 14), (512, 7), (512, 14), (256, 56)]
RATIOS = [2.25, 4.0, 8.0]
STRUCTURE = 16  # block-structured masks share channels and patterns over this many consecutive filters

# name -> (design id in pattern_lab.cc, block size N, flat_row rule, loads per vector FMA in the inner loop)
DESIGNS = {
    "a:bcast8": (0, 8, "w+1", 13 / 12),
    "a:bcast16": (1, 16, "w+1", 8 / 12),
    "a:vec4": (2, 4, "w+1", 7 / 12),
    "c:shift4": (3, 4, "x8", None),
    "a:zmm-bcast16": (4, 16, "w+1", 25 / 24),  # AVX-512 (only where the CPU has it)  # per row: 3 loads; per tap: 4 broadcasts for 8 FMAs (computed per layer)
}


def build(out_dir: str) -> ctypes.CDLL:
    """Compiles csrc/lab/pattern_lab.cc into out_dir/pattern_lab.so and loads it."""
    target = os.path.join(out_dir, "pattern_lab.so")
    cmd = ["g++", "-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared", "-std=c++17", "-o", target, str(SOURCE)]
    subprocess.run(cmd, check=True)
    lib = ctypes.CDLL(target)
    lib.lab_packed_floats.restype = ctypes.c_long
    lib.lab_packed_floats.argtypes = [ctypes.c_int] * 4
    lib.lab_run.restype = ctypes.c_int
    lib.lab_run.argtypes = [ctypes.c_int] * 7 + [ctypes.c_void_p] * 8
    return lib


@dataclass
class Layer:
    """A pruned 3x3 layer: `patterns` (library + assignment) and the masked dense weight (O, C, 3, 3)."""

    patterns: LayerPatterns
    dense: np.ndarray

    @property
    def kept(self) -> int:
        return self.patterns.kept_kernels()


def _library(rng, size=8) -> np.ndarray:
    return ALL_PATTERNS[rng.choice(len(ALL_PATTERNS), size, replace=False)]


def _with_weights(rng, patterns: LayerPatterns) -> Layer:
    mask = patterns.mask()
    return Layer(patterns, (rng.standard_normal(mask.shape).astype(np.float32) * mask).astype(np.float32))


def block_layer(rng, channels: int, ratio: float, block: int = STRUCTURE) -> Layer:
    """Every block of `block` consecutive filters keeps the same random channels with the same random patterns."""
    kept = kept_per_filter_for_ratio(channels, ratio)
    library = _library(rng)
    assignment = np.full((channels, channels), -1, np.int64)
    for b in range(0, channels, block):
        chosen = rng.choice(channels, kept, replace=False)
        assignment[b : b + block, chosen] = rng.integers(0, len(library), kept)[None, :]
    return _with_weights(rng, LayerPatterns(library, assignment))


def random_layer(rng, channels: int, ratio: float) -> Layer:
    """Each filter keeps its own random channels, each with a random pattern (today's per-filter pruning)."""
    kept = kept_per_filter_for_ratio(channels, ratio)
    library = _library(rng)
    assignment = np.full((channels, channels), -1, np.int64)
    for f in range(channels):
        assignment[f, rng.choice(channels, kept, replace=False)] = rng.integers(0, len(library), kept)
    return _with_weights(rng, LayerPatterns(library, assignment))


def tap_mask(layer: Layer) -> np.ndarray:
    """(O, C, 9) bool: the taps each kernel keeps."""
    return layer.patterns.mask().reshape(layer.dense.shape[0], layer.dense.shape[1], 9) > 0


def greedy_blocks(taps: np.ndarray, block: int) -> np.ndarray:
    """A filter order whose consecutive `block`s share many (channel, tap) pairs (design b): seed each block with the
    unplaced filter keeping the most taps, then add the filter overlapping the block's union most."""
    O = taps.shape[0]
    flat = taps.reshape(O, -1).astype(np.float32)
    left = np.ones(O, bool)
    order = []
    while left.any():
        seed = int(np.argmax(np.where(left, flat.sum(1), -1)))
        group, union = [seed], flat[seed].copy()
        left[seed] = False
        while len(group) < block and left.any():
            best = int(np.argmax(np.where(left, flat @ union, -1)))
            group.append(best)
            left[best] = False
            union = np.maximum(union, flat[best])
        order += group
    return np.array(order, np.int64)


@dataclass
class Program:
    """A block program (csrc/lab/pattern_lab.cc): blocks of N filters, each a list of (channel, tap) with N weights."""

    N: int
    filters: np.ndarray  # (nblocks * N) int32
    tap_begin: np.ndarray  # (nblocks + 1) int32
    channel: np.ndarray  # (T) int32
    tap: np.ndarray  # (T) int32
    weights: np.ndarray  # (T, N) float32, 32-byte aligned
    useful: int  # taps with a real weight (the rest are zeros of a padded union)

    @property
    def efficiency(self) -> float:
        return self.useful / max(1, len(self.channel) * self.N)


def _aligned(a: np.ndarray, alignment: int = 64) -> np.ndarray:
    raw = np.empty(a.nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    out = raw[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def make_program(layer: Layer, N: int, order: np.ndarray | None = None) -> Program:
    """Blocks of N filters in `order` (default: as they are); each block's taps are the union of its filters' taps."""
    O, C = layer.dense.shape[:2]
    assert O % N == 0
    order = np.arange(O) if order is None else order
    taps = tap_mask(layer)
    flat = layer.dense.reshape(O, C, 9)
    begin, channel, tap, weights = [0], [], [], []
    useful = 0
    for b in range(O // N):
        members = order[b * N : (b + 1) * N]
        union = taps[members].any(axis=0)  # (C, 9)
        cs, ts = np.nonzero(union)  # sorted by channel, then tap
        channel.append(cs)
        tap.append(ts)
        weights.append(flat[members][:, cs, ts].T)  # (T_b, N)
        useful += int(taps[members][:, cs, ts].sum())
        begin.append(begin[-1] + len(cs))
    return Program(N, order.astype(np.int32), np.array(begin, np.int32), np.concatenate(channel).astype(np.int32),
                   np.concatenate(tap).astype(np.int32), _aligned(np.concatenate(weights).astype(np.float32)), useful)


class LabKernel:
    """One design on one layer: a callable that packs x and computes y."""

    def __init__(self, lib, design: int, program: Program, channels: int, size: int, flat_row: int, threads: int):
        self.lib, self.design, self.p, self.threads = lib, design, program, threads
        self.C, self.H, self.flat_row = channels, size, flat_row
        self.packed = _aligned(np.zeros(lib.lab_packed_floats(channels, size, size, flat_row), np.float32))
        self.y = np.zeros((1, channels, size, size), np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        p = self.p
        rc = self.lib.lab_run(self.design, self.threads, self.C, self.H, self.H, self.flat_row, len(p.tap_begin) - 1,
                              p.filters.ctypes.data, p.tap_begin.ctypes.data, p.channel.ctypes.data,
                              p.tap.ctypes.data, p.weights.ctypes.data, x.ctypes.data, self.y.ctypes.data,
                              self.packed.ctypes.data)
        if rc != 0:
            raise RuntimeError(f"lab_run failed for design {self.design}")
        return self.y


def flat_row_for(rule: str, size: int) -> int:
    return size + 1 if rule == "w+1" else -(-(size + 1) // 8) * 8


def shift_loads_per_fma(program: Program) -> float:
    """kShift4: per (channel, kernel row) 3 vector loads, per tap 4 weight broadcasts, 8 vector FMAs per tap."""
    rows = len({(int(c), int(t) // 3, b) for b in range(len(program.tap_begin) - 1)
                for c, t in zip(program.channel[program.tap_begin[b]:program.tap_begin[b + 1]],
                                program.tap[program.tap_begin[b]:program.tap_begin[b + 1]])})
    taps = len(program.channel)
    return (3 * rows + 4 * taps) / (8 * taps)


def conv_float64(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """3x3, stride 1, pad 1 convolution in float64 (the plain sum over taps, each a matrix product)."""
    N, C, H, W = x.shape
    padded = np.zeros((C, H + 2, W + 2))
    padded[:, 1:-1, 1:-1] = x[0]
    y = np.zeros((weight.shape[0], H * W))
    for ky in range(3):
        for kx in range(3):
            y += weight[:, :, ky, kx].astype(np.float64) @ padded[:, ky : ky + H, kx : kx + W].reshape(C, -1)
    return y.reshape(1, -1, H, W)


def time_alternating(contenders: dict, x: np.ndarray, runs: int, block: int) -> dict:
    """name -> (median s, best s): every contender runs `block` times in turn, until each has `runs` runs."""
    for f in contenders.values():
        for _ in range(2):
            f(x)
    times = {name: [] for name in contenders}
    for _ in range(max(1, runs // block)):
        for name, f in contenders.items():
            for _ in range(block):
                t0 = time.perf_counter()
                f(x)
                times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def check(name: str, got: np.ndarray, want: np.ndarray, tol: float = 1e-4) -> float:
    err = float(np.max(np.abs(got - want)) / max(1e-30, float(np.max(np.abs(want)))))
    if not err <= tol:
        raise AssertionError(f"{name}: relative error {err:.2e} > {tol:g}")
    return err


def ort_runner(model, threads, library=None, isa=None):
    """A callable x -> y for an onnxruntime session; `isa` pins ctprune's tier (read when the session is made)."""
    previous = os.environ.get("CTPRUNE_FORCE_ISA")
    if isa:
        os.environ["CTPRUNE_FORCE_ISA"] = isa
    try:
        s = session(model, threads, library)
    finally:
        if isa:
            if previous is None:
                os.environ.pop("CTPRUNE_FORCE_ISA", None)
            else:
                os.environ["CTPRUNE_FORCE_ISA"] = previous
    return lambda x: s.run(None, {"X": x})[0]


def product_tiers() -> list[str]:
    """The product kernel's tiers worth timing here: avx2, plus avx512 when this CPU has it."""
    flags = pathlib.Path("/proc/cpuinfo").read_text() if pathlib.Path("/proc/cpuinfo").exists() else ""
    return ["avx2"] + (["avx512"] if " avx512f" in flags and " avx512vl" in flags else [])


def bench_case(lib, library_path, rng, channels, size, ratio, threads, runs, block, designs, validate64=False):
    """One layer shape at one ratio: every contender on the block-structured layer, design (b) on a random one."""
    shape = (1, channels, size, size)
    x = rng.standard_normal(shape).astype(np.float32)
    rows = []

    def measure(layer: Layer, contenders: dict, extra: dict):
        dense = ort_runner(dense_conv_layer_model(layer.dense, shape, pads=(1, 1, 1, 1)), threads)
        want = dense(x)
        if validate64:
            check("onnxruntime dense vs float64", want, conv_float64(x, layer.dense), 1e-4)
        for name, f in contenders.items():
            check(name, f(x), want)
        timed = time_alternating(dict(dense=dense, **contenders), x, runs, block)
        t_dense, best_dense = timed.pop("dense")
        useful = 8.0 * layer.kept * size * size
        for name, (t, best) in timed.items():
            rows.append(dict(C=channels, H=size, ratio=ratio, threads=threads, design=name, dense_ms=t_dense * 1e3,
                             ms=t * 1e3, speedup=t_dense / t, best_speedup=best_dense / best,
                             gflops=useful / t / 1e9, dense_gflops=2 * 9 * channels * channels * size * size / t_dense / 1e9,
                             **extra.get(name, {})))

    # Block-structured layer: the product kernel (per filter) and designs (a), (c).
    layer = block_layer(rng, channels, ratio)
    compact = compact_from_dense(layer.dense, layer.patterns)
    contenders, extra = {}, {}
    for isa in product_tiers():
        contenders[f"product:{isa}"] = ort_runner(
            pattern_conv_layer_model(compact, shape, pads=(1, 1, 1, 1)), threads, library_path, isa)
        extra[f"product:{isa}"] = dict(loads_per_fma=1.0 + 1.0 / 14 if isa == "avx2" else 1.0 + 1.0 / 24, efficiency=1.0)
    for name in designs:
        design, N, rule, loads = DESIGNS[name]
        program = make_program(layer, N)
        contenders[name] = LabKernel(lib, design, program, channels, size, flat_row_for(rule, size), threads)
        extra[name] = dict(loads_per_fma=loads if loads is not None else shift_loads_per_fma(program),
                           efficiency=program.efficiency)
    measure(layer, contenders, extra)

    # Design (b): today's per-filter random mask, filters reordered into blocks of 8, padded union.
    layer = random_layer(rng, channels, ratio)
    compact = compact_from_dense(layer.dense, layer.patterns)
    order = greedy_blocks(tap_mask(layer), 8)
    program = make_program(layer, 8, order)
    contenders = {"random:product:" + product_tiers()[-1]: ort_runner(
        pattern_conv_layer_model(compact, shape, pads=(1, 1, 1, 1)), threads, library_path)}
    contenders["b:reorder8+bcast8"] = LabKernel(lib, 0, program, channels, size, size + 1, threads)
    extra = {"b:reorder8+bcast8": dict(loads_per_fma=13 / 12 / program.efficiency, efficiency=program.efficiency)}
    measure(layer, contenders, extra)
    return rows


def sharing_table(rng, ratios, blocks=(2, 4, 8)) -> str:
    """Design (b) on random per-filter masks: the share of a padded block's multiply-adds that are real, with the
    filters in their own order and after the greedy reordering."""
    lines = ["| C=O | ratio | block | useful share, filter order | useful share, greedy reorder |", "|---|---|---|---|---|"]
    for channels, _ in LAYERS[:4]:
        for ratio in ratios:
            layer = random_layer(rng, channels, ratio)
            taps = tap_mask(layer)
            for N in blocks:
                plain = make_program(layer, N).efficiency
                greedy = make_program(layer, N, greedy_blocks(taps, N)).efficiency
                lines.append(f"| {channels} | {ratio:g}x | {N} | {plain:.0%} | {greedy:.0%} |")
    return "\n".join(lines)


def render(rows) -> str:
    lines = ["| C=O | H=W | ratio | threads | design | dense ms | design ms | speedup | best-of | useful GFLOP/s | "
             "dense GFLOP/s | loads/FMA | useful MAC share |", "|" + "---|" * 13]
    for r in rows:
        lines.append(f"| {r['C']} | {r['H']} | {r['ratio']:g}x | {r['threads']} | {r['design']} | {r['dense_ms']:.3f} | "
                     f"{r['ms']:.3f} | {r['speedup']:.2f}x | {r['best_speedup']:.2f}x | {r['gflops']:.1f} | "
                     f"{r['dense_gflops']:.1f} | {r.get('loads_per_fma', float('nan')):.2f} | "
                     f"{r.get('efficiency', 1.0):.0%} |")
    return "\n".join(lines)


def summary(rows) -> str:
    lines = ["| ratio | threads | design | median speedup | min | max | median best-of |", "|" + "---|" * 7]
    keys = sorted({(r["ratio"], r["threads"], r["design"]) for r in rows})
    for ratio, threads, design in keys:
        v = [r["speedup"] for r in rows if (r["ratio"], r["threads"], r["design"]) == (ratio, threads, design)]
        b = [r["best_speedup"] for r in rows if (r["ratio"], r["threads"], r["design"]) == (ratio, threads, design)]
        lines.append(f"| {ratio:g}x | {threads} | {design} | {statistics.median(v):.2f}x | {min(v):.2f}x | "
                     f"{max(v):.2f}x | {statistics.median(b):.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=RATIOS)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--layers", nargs="+", default=None, help="e.g. 64x56 512x7 (default: the 6 lab layers)")
    parser.add_argument("--designs", nargs="+", default=None, choices=list(DESIGNS),
                        help="default: all (the AVX-512 one only where the CPU has AVX-512)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per contender and layer")
    parser.add_argument("--block", type=int, default=5, help="runs per turn when alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sharing", action="store_true", help="only the design (b) sharing table")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    if args.sharing:
        print(sharing_table(rng, args.ratios))
        return 0
    from ctprune.runtime import kernel_library_path

    designs = args.designs or [d for d in DESIGNS if not d.startswith("a:zmm") or "avx512" in product_tiers()]
    layers = LAYERS if not args.layers else [tuple(int(v) for v in s.split("x")) for s in args.layers]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(tmp)
        first = True
        for threads in args.threads:
            for ratio in args.ratios:
                for channels, size in layers:
                    rows += bench_case(lib, kernel_library_path(), rng, channels, size, ratio, threads, args.runs,
                                       args.block, designs, validate64=first)
                    first = False
                    print(render([r for r in rows if (r["C"], r["H"], r["ratio"], r["threads"]) ==
                                  (channels, size, ratio, threads)]).split("\n", 2)[2], flush=True)
    print()
    print(render(rows))
    print()
    print(summary(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
