"""Per-layer benchmark of ctprune's PatternConv CUDA kernel against cuDNN's dense convolution (torch conv2d, float32).

    python -m ctprune.lab.bench_cuda                    # the CPU benchmark's layer set, batch 1 and 32, 2.25x/4x/8x
    python -m ctprune.lab.bench_cuda --quick            # fewer runs
    python -m ctprune.lab.bench_cuda --markdown out.md  # also write the tables
    python -m ctprune.lab.bench_cuda --sparse           # SparseConv's kernels instead (bench_cuda_sparse.py)

Needs a CUDA GPU, torch with CUDA and nvcc (the kernel is built through ctprune.lab.cuda_harness). Layers are drawn as
the CPU benchmark draws them (ctprune.lab.bench_layers: every filter keeps the same number of kernels). cuDNN runs on the
masked dense weight with cudnn.benchmark on (its best algorithm per shape), TF32 off ("fp32") and on ("tf32"); each
time is the median over blocks of back-to-back launches timed with CUDA events, the three contenders alternating
block by block. "useful GFLOP/s" counts only the multiply-adds PatternConv keeps (4 per kept kernel per output).
Every layer is also checked: max |kernel - cuDNN fp32| / max |cuDNN fp32| is in the "rel err" column.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np

from ctprune.lab.bench_layers import LAYER_SET, kept_per_filter_for_ratio, median_summary, random_pattern_layer

RATIOS = [2.25, 4.0, 8.0]
BATCHES = [1, 32]


def _time_blocks(fns, runs: int, per_block: int):
    """Median seconds per call of each fn, alternating blocks of `per_block` back-to-back calls."""
    import torch

    times = [[] for _ in fns]
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(runs):
        for i, fn in enumerate(fns):
            start.record()
            for _ in range(per_block):
                fn()
            stop.record()
            stop.synchronize()
            times[i].append(start.elapsed_time(stop) / 1e3 / per_block)
    return [statistics.median(t) for t in times]


def time_against_dense(fp32, tf32, ours, y, runs: int, per_block: int) -> tuple[float, float, float, float]:
    """(rel err, fp32 s, tf32 s, ours s): the dense contenders and ours (which writes y) warmed up, ours checked
    against fp32 (max |y - fp32| / max |fp32|), then the three timed by _time_blocks."""
    import torch

    for fn in (fp32, tf32, ours):  # warm up: cuDNN autotuning, module load
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    ref = fp32()
    ours()
    torch.cuda.synchronize()
    err = float((y - ref).abs().max() / ref.abs().max())
    return (err, *_time_blocks([fp32, tf32, ours], runs, per_block))


def bench_layer(channels: int, size: int, ratio: float, batch: int, rng, runs: int, per_block: int) -> dict:
    import torch

    from ctprune.lab.cuda_harness import CudaPatternConv, PatternConvLayer

    src = random_pattern_layer(rng, channels, channels, kept_per_filter_for_ratio(channels, ratio))
    layer = PatternConvLayer((channels, channels, 3, 3), [int(v) for v in src.patterns.ravel()],
                             src.kernel_filters.tolist(), src.kernel_channels.tolist(), src.kernel_patterns.tolist(),
                             src.weights, rng.standard_normal(channels).astype(np.float32))
    dev = torch.device("cuda")
    x = torch.from_numpy(rng.standard_normal((batch, channels, size, size)).astype(np.float32)).to(dev)
    dense_w = torch.from_numpy(src.dense).to(dev)
    bias = torch.from_numpy(layer.bias).to(dev)
    w = torch.from_numpy(layer.weights).to(dev)
    kernel = CudaPatternConv(layer)
    y = torch.empty((batch, channels, size, size), device=dev)

    def dense_fn(tf32: bool):
        def run():
            torch.backends.cudnn.allow_tf32 = tf32
            return torch.nn.functional.conv2d(x, dense_w, bias, padding=1)
        return run

    ours = lambda: kernel(x, w, bias, out=y)
    err, t_fp32, t_tf32, t_ours = time_against_dense(dense_fn(False), dense_fn(True), ours, y, runs, per_block)
    kernel.close()
    kept = len(layer.kernel_filters)
    useful = 2.0 * 4 * kept * size * size * batch
    return dict(C=channels, H=size, ratio=ratio, achieved=channels * channels * 9 / (4 * kept), batch=batch,
                fp32_us=t_fp32 * 1e6, tf32_us=t_tf32 * 1e6, ours_us=t_ours * 1e6, vs_fp32=t_fp32 / t_ours,
                vs_tf32=t_tf32 / t_ours, gflops=useful / t_ours / 1e9, err=err)


def render(rows) -> str:
    lines = ["| C=O | H=W | ratio | batch | cuDNN fp32 us | cuDNN tf32 us | PatternConv us | vs fp32 | vs tf32 | "
             "useful GFLOP/s | rel err |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['C']} | {r['H']} | {r['ratio']:g}x | {r['batch']} | {r['fp32_us']:.1f} | {r['tf32_us']:.1f} | "
                     f"{r['ours_us']:.1f} | {r['vs_fp32']:.2f}x | {r['vs_tf32']:.2f}x | {r['gflops']:.0f} | {r['err']:.1e} |")
    return "\n".join(lines)


def summary(rows) -> str:
    return median_summary(rows, ["ratio", "batch"], "vs_fp32", "vs_tf32",
                          ["ratio", "batch", "median vs fp32", "min", "max", "median vs tf32"])


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU; says so on stderr where it does not."""
    import torch

    if torch.cuda.is_available():
        return True
    print("bench_cuda: no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU machine.",
          file=sys.stderr)
    return False


def publish(text: str, markdown: str | None) -> None:
    """Print the tables, and write them to `markdown` where given."""
    print(text)
    if markdown:
        with open(markdown, "w") as f:
            f.write(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed blocks")
    parser.add_argument("--batch", type=int, nargs="+", default=BATCHES)
    parser.add_argument("--ratios", type=float, nargs="+", default=None, help="default 2.25 4 8 (--sparse: 2 4 8)")
    parser.add_argument("--sparse", action="store_true", help="SparseConv's 1x1 and FC shapes (bench_cuda_sparse.py)")
    parser.add_argument("--runs", type=int, default=None, help="timed blocks per contender and layer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", default=None, help="also write the tables to this file")
    args = parser.parse_args(argv)
    args.ratios_given = args.ratios is not None
    args.ratios = args.ratios or RATIOS
    if args.sparse:
        from ctprune.lab.bench_cuda_sparse import main_sparse

        return main_sparse(args)

    import torch

    if not cuda_available():
        return 2
    from tqdm import tqdm

    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.benchmark = True
    runs = args.runs or (7 if args.quick else 21)
    rng = np.random.default_rng(args.seed)
    jobs = [(c, h, r, b) for b in args.batch for r in args.ratios for c, h in LAYER_SET]
    rows = []
    for c, h, r, b in tqdm(jobs, desc="layers", unit="layer"):
        per_block = 20 if b == 1 else 5
        rows.append(bench_layer(c, h, r, b, rng, runs, per_block))
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved
    device = torch.cuda.get_device_name()
    text = (f"PatternConv CUDA kernel vs cuDNN (torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
            f"{device})\n\n{render(rows)}\n\n{summary(rows)}\n")
    publish(text, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
