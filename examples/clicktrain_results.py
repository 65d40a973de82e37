"""ClickTrain on the Fashion-MNIST examples: accuracy vs ratio, fine-tune time, end-to-end latency; and prune-during
(ClickTrain) vs prune-after (one-shot magnitude patterns + connectivity, then the same fine-tune) at the same time.

    .venv/bin/python examples/clicktrain_results.py                      # the committed table and plot
    .venv/bin/python examples/clicktrain_results.py --epochs 1 --train-limit 10000 --ratios 8

Writes examples/RESULTS_clicktrain.md (the table and the command) and examples/clicktrain_results.png.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ctprune  # noqa: E402
from ctprune.report import render_table  # noqa: E402

DATA = ROOT / ".deps" / "fashion-mnist"
MODELS = {"resnet20": ROOT / "examples" / "models" / "resnet20_fmnist.onnx",
          "vgg": ROOT / "examples" / "models" / "vgg_fmnist.onnx"}


def _subset(src: pathlib.Path, limit: int | None, seed: int, tmp: pathlib.Path) -> pathlib.Path:
    if not limit:
        return src
    d = np.load(src)
    idx = np.random.default_rng(seed).permutation(len(d["x"]))[:limit]
    out = tmp / f"{src.stem}_{limit}.npz"
    np.savez(out, x=d["x"][idx], y=d["y"][idx])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", default="resnet20,vgg")
    ap.add_argument("--ratios", default="2.25,4,8,16")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-limit", type=int, default=20000, help="training images used (0: all 60,000)")
    ap.add_argument("--eval-limit", type=int, default=0, help="test images used (0: all 10,000)")
    ap.add_argument("--baseline-ratio", type=float, default=8.0, help="ratio of the prune-after comparison")
    ap.add_argument("--out", default=str(ROOT / "examples" / "RESULTS_clicktrain.md"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rows, records = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        train = _subset(DATA / "train.npz", args.train_limit, args.seed, tmp)
        test = _subset(DATA / "test.npz", args.eval_limit, args.seed, tmp)
        runs = []
        for net in args.nets.split(","):
            for ratio in [float(r) for r in args.ratios.split(",")]:
                runs.append((net, ratio, "clicktrain"))
            runs.append((net, args.baseline_ratio, "oneshot"))
        for net, ratio, schedule in runs:
            start = time.perf_counter()
            result = ctprune.prune(str(MODELS[net]), ratio=ratio, data=str(train), eval_data=str(test),
                                   epochs=args.epochs, quiet=True, seed=args.seed, schedule=schedule)
            wall = time.perf_counter() - start
            r = result.report
            rec = {"net": net, "ratio": ratio, "schedule": schedule, "acc_dense": r["accuracy"]["before"],
                   "acc_pruned": r["accuracy"]["after"], "ratio_achieved": r["ratio_achieved"],
                   "train_s": r["train"]["seconds"], "wall_s": wall, "lat_dense": r["latency_ms"]["dense"],
                   "lat_pruned": r["latency_ms"]["pruned"]}
            records.append(rec)
            print(json.dumps(rec), flush=True)
            rows.append([net, f"{ratio:g}x", "ClickTrain (during)" if schedule == "clicktrain" else "one-shot (after)",
                         f"{rec['ratio_achieved']:.2f}x", f"{100 * rec['acc_dense']:.2f}", f"{100 * rec['acc_pruned']:.2f}",
                         f"{100 * (rec['acc_pruned'] - rec['acc_dense']):+.2f}", f"{rec['train_s']:.0f}",
                         f"{rec['lat_dense']:.3f}", f"{rec['lat_pruned']:.3f}", f"{rec['lat_dense'] / rec['lat_pruned']:.2f}x"])

    table = render_table(["net", "ratio", "pruning", "achieved", "dense acc %", "pruned acc %", "delta", "fine-tune s",
                          "dense ms", "pruned ms", "speedup"], rows, align="lllrrrrrrrr")
    command = "python examples/clicktrain_results.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    text = (f"# ClickTrain on Fashion-MNIST\n\nMade by `{command.strip()}` on this repo's 2-core CPU machine "
            f"({args.epochs} fine-tune epoch(s) on {args.train_limit or 60000} training images, evaluation on "
            f"{args.eval_limit or 10000} test images; latency: onnxruntime, 1 thread, batch 1, median).\n\n```\n{table}\n```\n\n"
            "![accuracy vs ratio](clicktrain_results.png)\n")
    pathlib.Path(args.out).write_text(text)
    _plot(records, pathlib.Path(args.out).with_name("clicktrain_results.png"))
    print(table)


def _plot(records, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for net in sorted({r["net"] for r in records}):
        pts = sorted((r["ratio"], 100 * r["acc_pruned"]) for r in records if r["net"] == net and r["schedule"] == "clicktrain")
        dense = 100 * next(r["acc_dense"] for r in records if r["net"] == net)
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{net} ClickTrain")
        ax.axhline(dense, color=line.get_color(), ls=":", label=f"{net} dense")
        for r in records:
            if r["net"] == net and r["schedule"] == "oneshot":
                ax.plot([r["ratio"]], [100 * r["acc_pruned"]], "x", color=line.get_color(), ms=9,
                        label=f"{net} one-shot + fine-tune")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("compression of 3x3 conv weights")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
