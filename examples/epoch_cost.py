"""Cost of a masked ClickTrain epoch against a dense fine-tune epoch (issue 4: at most 1.25x).

Both arms are `ctprune.pipeline.Pipeline` on the examples' ResNet-20 with the same data, batch size, teacher
(distillation) and seed; the dense arm fine-tunes the lifted model with no pruner and no BatchNorm recalibration, the
masked arm is the default 8x ClickTrain run. Only the training loop is timed (TrainResult.seconds), runs alternate.

    OMP_NUM_THREADS=1 .venv/bin/python examples/epoch_cost.py --pairs 3
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ctprune.pipeline import Pipeline  # noqa: E402
from ctprune.report.render import render_table  # noqa: E402


class _DenseDone(Exception):
    pass


class DenseFineTune(Pipeline):
    """The same pipeline up to the pattern stage, which becomes a plain fine-tune of the dense model."""

    def _pattern(self, model, ratio, checkpoint_tag=""):
        self.train_result = self._fine_tune(self._lift(model))
        raise _DenseDone


def train_seconds(pipeline_class, data: str, epochs: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        p = pipeline_class(model=str(ROOT / "examples/models/resnet20_fmnist.onnx"), ratio=8.0, method="pattern",
                           data=data, epochs=epochs, quiet=True, seed=0, allocation="balanced",
                           checkpoint_dir=pathlib.Path(tmp) / "ckpt")
        try:
            p.run()
        except _DenseDone:
            pass
        return p.train_result.seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3, help="dense/masked runs, alternating")
    ap.add_argument("--data", default=str(ROOT / ".deps/fashion-mnist/train_12k.npz"))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = {"dense": [], "masked": []}
    for _ in range(args.pairs):
        runs["dense"].append(train_seconds(DenseFineTune, args.data, args.epochs))
        runs["masked"].append(train_seconds(Pipeline, args.data, args.epochs))
    rows = [[arm, " / ".join(f"{s:.1f}" for s in seconds), f"{np.median(seconds):.1f}"] for arm, seconds in runs.items()]
    print(render_table(["fine-tune", "train-loop seconds per run", "median"], rows, align="llr"))
    print(f"masked / dense: {np.median(runs['masked']) / np.median(runs['dense']):.2f}x "
          f"({args.epochs} epoch(s) on {args.data}, torch on {args.threads} thread(s))")


if __name__ == "__main__":
    main()
