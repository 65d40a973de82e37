"""Per-layer benchmark of ctprune's SparseConv CUDA kernels against cuDNN / cuBLAS on the masked dense weight (torch
conv2d / linear, float32, TF32 off and on).

    python -m ctprune.lab.bench_cuda --sparse                  # 1x1 and FC shapes, batch 1 and 32, 2x/4x/8x
    python -m ctprune.lab.bench_cuda --sparse --quick --markdown out.md

The shapes are the CPU SparseConv benchmark's (ctprune.lab.bench_sparse: MobileNetV2 / ResNet-50 1x1 layers, VGG and
MobileNet FC layers), drawn by the same block-mask builder as the tests (ctprune.lab.layer_model), blocks of 4 output
channels for a Conv and 8 for an FC. Timing as bench_cuda: CUDA events over blocks of back-to-back launches, the
three contenders alternating, medians. "useful GFLOP/s" counts only the kept multiply-adds; "rel err" is max |kernel -
fp32| / max |fp32|.
"""

from __future__ import annotations

import numpy as np

from ctprune.lab.bench_cuda import cuda_available, publish, summary, time_against_dense
from ctprune.lab.bench_sparse import FC, POINTWISE

RATIOS = [2.0, 4.0, 8.0]
BATCHES = [1, 32]


def bench_sparse_layer(kind: str, shape, ratio: float, batch: int, rng, runs: int, per_block: int) -> dict:
    import torch

    from ctprune.lab.cuda_sparse_harness import CudaSparseConv, random_sparse_layer

    if kind == "fc":
        o, i = shape
        weight_shape, x_shape, block, macs = (o, i), (batch, i), 8, o * i * batch
    else:
        c, o, h = shape
        weight_shape, x_shape, block, macs = (o, c, 1, 1), (batch, c, h, h), 4, o * c * h * h * batch
    layer = random_sparse_layer(rng, weight_shape, ratio, block)
    dev = torch.device("cuda")
    x = torch.from_numpy(rng.standard_normal(x_shape).astype(np.float32)).to(dev)
    dense = torch.from_numpy(layer.compact.dense()).to(dev)
    bias = torch.from_numpy(layer.bias).to(dev)
    w = torch.from_numpy(layer.weights).to(dev)
    kernel = CudaSparseConv(layer)
    y = torch.empty((batch, o) if kind == "fc" else (batch, o, h, h), device=dev)

    def dense_fn(tf32: bool):
        def run():
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
            if kind == "fc":
                return torch.nn.functional.linear(x, dense, bias)
            return torch.nn.functional.conv2d(x, dense, bias)
        return run

    ours = lambda: kernel(x, w, bias, out=y)
    err, t_fp32, t_tf32, t_ours = time_against_dense(dense_fn(False), dense_fn(True), ours, y, runs, per_block)
    kernel.close()
    kept = layer.compact.kept
    dense_weights = int(np.prod(weight_shape))
    return dict(kind=kind, shape="x".join(str(v) for v in shape), ratio=ratio, achieved=dense_weights / max(1, kept),
                batch=batch, fp32_us=t_fp32 * 1e6, tf32_us=t_tf32 * 1e6, ours_us=t_ours * 1e6,
                vs_fp32=t_fp32 / t_ours, vs_tf32=t_tf32 / t_ours,
                gflops=2.0 * macs * kept / dense_weights / t_ours / 1e9, err=err)


def render(rows) -> str:
    lines = ["| layer | shape | ratio | batch | dense fp32 us | dense tf32 us | SparseConv us | vs fp32 | vs tf32 | "
             "useful GFLOP/s | rel err |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['shape']} | {r['ratio']:g}x | {r['batch']} | {r['fp32_us']:.1f} | "
                     f"{r['tf32_us']:.1f} | {r['ours_us']:.1f} | {r['vs_fp32']:.2f}x | {r['vs_tf32']:.2f}x | "
                     f"{r['gflops']:.0f} | {r['err']:.1e} |")
    return "\n".join(lines)


def main_sparse(args) -> int:
    """bench_cuda --sparse: `args` from bench_cuda's parser (quick, batch, ratios, runs, seed, markdown)."""
    import torch

    if not cuda_available():
        return 2
    from tqdm import tqdm

    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.benchmark = True
    runs = args.runs or (7 if args.quick else 21)
    rng = np.random.default_rng(args.seed)
    ratios = args.ratios if args.ratios_given else RATIOS
    jobs = [(k, s, r, b) for b in args.batch for r in ratios for k, s in
            [("conv", p) for p in POINTWISE] + [("fc", f) for f in FC]]
    rows = [bench_sparse_layer(k, s, r, b, rng, runs, 20 if b == 1 else 5)
            for k, s, r, b in tqdm(jobs, desc="layers", unit="layer")]
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    text = (f"SparseConv CUDA kernels vs cuDNN/cuBLAS (torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
            f"{torch.cuda.get_device_name()})\n\n{render(rows)}\n\n{summary(rows)}\n")
    publish(text, args.markdown)
    return 0
