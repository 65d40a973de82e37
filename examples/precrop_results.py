"""PreCropping results: the accuracy table of issue 5 and the onnxruntime speed of cropped models.

    OMP_NUM_THREADS=1 nice .venv/bin/python examples/precrop_results.py accuracy --epochs 3 --train-subset 20000
    OMP_NUM_THREADS=1 nice .venv/bin/python examples/precrop_results.py speed

accuracy: Fashion-MNIST, the examples' ResNet-20, trained from scratch for the same epochs at 4x fewer conv weights by
  the arms (--arms, per --seeds):
  synflow-macs / synflow: PreCropping with MACs-bounded / plain SynFlow densities (a smaller dense net; plain SynFlow
  drops the residual blocks it keeps almost nothing of, unless --keep-branches),
  uniform: the same cropping with uniform densities (every group keeps ~1/2 of its channels),
  unstructured: the dense net with SynFlow's weight mask held fixed during training,
  dense: the dense net itself for reference. Every arm gets the same fresh initialisation scheme, data, epochs, seed.
speed: onnxruntime latency (1 thread, batch 1, median) of dense vs 2x/4x-cropped nets.
Both write markdown tables to stdout (examples/RESULTS_precrop.md holds the committed ones).
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import pathlib
import statistics
import sys
import time

import numpy as np
import onnx
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ctprune.graph import lift  # noqa: E402
from ctprune.pruning.precrop import apply_crop, channel_graph, plan_crop  # noqa: E402
from ctprune.pruning.precrop.densities import _global_keep, _synflow  # noqa: E402
from ctprune.report.build import conv_weights  # noqa: E402
from ctprune.train import Dataset, TrainHooks, fine_tune  # noqa: E402

log = logging.getLogger("precrop_results")


# ---- models ---------------------------------------------------------------------------------------------------------
def resnet20_onnx(seed: int) -> onnx.ModelProto:
    """A freshly initialised ResNet-20 (examples/fmnist.py) as ONNX: the graph PreCropping plans on."""
    from examples.fmnist import ResNet20

    torch.manual_seed(seed)
    net = ResNet20().train()
    buf = io.BytesIO()
    # Exported in training mode so BatchNormalization stays (eval export folds it into the Convs, and a BN-free
    # ResNet-20 trained from scratch diverges); then every BN is turned into the plain inference op.
    torch.onnx.export(net, (torch.zeros(2, 1, 28, 28),), buf, dynamo=False, opset_version=17,
                      training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    model = onnx.load_from_string(buf.getvalue())
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            del node.output[1:]
            kept = [a for a in node.attribute if a.name != "training_mode"]
            del node.attribute[:]
            node.attribute.extend(kept)
    onnx.checker.check_model(model, full_check=True)
    return model


def fresh_init(module, seed: int) -> None:
    """Kaiming-normal Conv/Gemm weights (fan-in), zero biases, BN at identity: the same for every arm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.onnx_parameters().values():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * math.sqrt(2.0 / math.prod(p.shape[1:])))
        for name, p in module.onnx_parameters().items():
            if p.dim() == 1:
                p.fill_(1.0 if "weight" in name or "scale" in name else 0.0)


class HoldMask(TrainHooks):
    """Unstructured pruning: multiply the weights by their fixed mask after every optimizer step."""

    def __init__(self, params: dict, masks: dict):
        self.pairs = [(params[n], m) for n, m in masks.items()]
        self.begin(0, 0)

    def begin(self, total_steps, steps_per_epoch):
        with torch.no_grad():
            for p, m in self.pairs:
                p.mul_(m.to(p.device, p.dtype))

    def after_backward(self, step):
        # Pruned weights get no gradient: no momentum for them, and they do not inflate the norm the loop clips by.
        for p, m in self.pairs:
            if p.grad is not None:
                p.grad.mul_(m.to(p.grad.device, p.grad.dtype))

    def after_step(self, step):
        self.begin(0, 0)


# ---- accuracy table -------------------------------------------------------------------------------------------------
ARMS = {
    "synflow-macs": "PreCropping + SynFlow, MACs-bounded",
    "synflow": "PreCropping + SynFlow",
    "uniform": "uniform channel scaling",
    "unstructured": "unstructured SynFlow mask",
    "dense": "dense (reference)",
}


def build_arm(arm: str, dense: onnx.ModelProto, ratio: float, seed: int, channel_multiple: int = 8,
              drop_branches: bool = True):
    """(model to train, fixed weight mask or None, conv-weight ratio) for one arm."""
    if arm == "dense":
        return dense, None, 1.0
    if arm == "unstructured":
        # The dense graph with SynFlow's mask at the same ratio, held during training.
        convs = [l.weight for l in channel_graph(dense).layers if l.op == "Conv"]
        masks = _global_keep(_synflow(dense, convs, ratio, 20), 1.0 / ratio, keep_largest=True)
        return dense, masks, conv_weights(dense) / sum(int(m.sum()) for m in masks.values())
    cropped = apply_crop(dense, plan_crop(dense, ratio, pai=arm, pretrained=False, seed=seed,
                                          channel_multiple=channel_multiple, drop_branches=drop_branches))
    return cropped, None, conv_weights(dense) / conv_weights(cropped)


def accuracy(args) -> str:
    from examples.fmnist import load_fmnist

    x, y = load_fmnist("train")
    xt, yt = load_fmnist("test")
    test = Dataset(xt[: args.test_subset], yt[: args.test_subset], source="fmnist test")
    results = {arm: [] for arm in args.arms}  # arm → [(ratio, accuracy %, seconds)] per seed
    for seed in args.seeds:
        pick = np.random.default_rng(seed).permutation(len(x))[: args.train_subset]
        train = Dataset(x[pick], y[pick], source=f"fmnist train ({len(pick)})")
        dense = resnet20_onnx(seed)
        for arm in args.arms:
            model, mask, ratio = build_arm(arm, dense, args.ratio, seed, args.channel_multiple,
                                           not args.keep_branches)
            module = lift(model)
            fresh_init(module, seed)
            hooks = HoldMask(module.onnx_parameters(), mask) if mask else None
            t0 = time.time()
            result = fine_tune(module, None, train=train, eval=test, epochs=args.epochs, batch_size=args.batch_size,
                               lr=args.lr, seed=seed, device="cpu", hooks=hooks, quiet=args.quiet)
            seconds = time.time() - t0
            results[arm].append((ratio, 100 * result.accuracy, seconds))
            log.info("seed %d, %s: %.2fx, accuracy %.2f%%, %.0f s", seed, ARMS[arm], ratio, 100 * result.accuracy,
                     seconds)
    seeds = ", ".join(map(str, args.seeds))
    lines = [f"Fashion-MNIST, ResNet-20 from scratch, {args.epochs} epoch(s) on {args.train_subset} training images "
             f"(a per-seed sample), test on {len(test)}; batch {args.batch_size}, lr {args.lr}, seeds {seeds}, "
             f"PreCropping channel multiple {args.channel_multiple}"
             f"{', residual branches kept' if args.keep_branches else ''}.", "",
             "| method | conv-weight ratio | test accuracy per seed | mean | train time (mean) |",
             "|---|---:|---:|---:|---:|"]
    for arm, runs in results.items():
        accs = [a for _, a, _ in runs]
        lines.append(f"| {ARMS[arm]} | {runs[0][0]:.2f}x | {' / '.join(f'{a:.2f}%' for a in accs)} | "
                     f"{statistics.mean(accs):.2f}% | {statistics.mean(s for _, _, s in runs):.0f} s |")
    return "\n".join(lines)


# ---- speed ----------------------------------------------------------------------------------------------------------
def session(model: onnx.ModelProto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def interleaved_latency_ms(models: list[onnx.ModelProto], x: np.ndarray, repeats: int) -> list[float]:
    """Median latency of each model, the models run in turn within every repeat: on a shared machine a load spike
    then hits all of them alike instead of whichever happened to be measured at the time."""
    sessions = [session(m) for m in models]
    feed = {sessions[0].get_inputs()[0].name: x}
    for sess in sessions:
        for _ in range(5):
            sess.run(None, feed)
    times = [[] for _ in sessions]
    for r in range(repeats):
        order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
        for i in order:
            t = time.perf_counter()
            sessions[i].run(None, feed)
            times[i].append(time.perf_counter() - t)
    return [1e3 * statistics.median(t) for t in times]


def speed(args) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_precrop_nets import densenet, mobilenet_v2, resnet, se_net

    nets = {
        "ResNet-style (64-256 ch, 64x64)": (lambda: resnet(width=64, size=64), 64),
        "MobileNetV2-style (96x96)": (lambda: mobilenet_v2(size=96, width=32), 96),
        "DenseNet-style (Concat, 64x64)": (lambda: densenet(size=64, growth=32, layers=(4, 4)), 64),
        "squeeze-excite (64x64)": (lambda: se_net(size=64, width=64, blocks=4), 64),
    }
    from ctprune.report.inspect import layer_table

    lines = ["onnxruntime CPU, 1 thread, batch 1, median of %d runs (dense, 2x and 4x run in turn); PreCropping with %s "
             "densities; conv-weight ratio 2x / 4x (MACs ratio in brackets)." % (args.repeats, args.pai), "",
             "| net | dense ms | 2x ms | 2x speed-up | 4x ms | 4x speed-up |", "|---|---:|---:|---:|---:|---:|"]
    for name, (build, size) in nets.items():
        model = build()
        x = np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32)
        macs = layer_table(model)[1]["macs"]
        cropped = [apply_crop(model, plan_crop(model, ratio, pai=args.pai)) for ratio in (2, 4)]
        base, *times = interleaved_latency_ms([model, *cropped], x, args.repeats)
        cells = [f"{t:.2f} | {base / t:.2f}x ({macs / layer_table(c)[1]['macs']:.2f}x MACs)"
                 for t, c in zip(times, cropped)]
        lines.append(f"| {name} | {base:.2f} | {cells[0]} | {cells[1]} |")
        log.info(lines[-1])
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    acc = sub.add_parser("accuracy")
    acc.add_argument("--ratio", type=float, default=4.0)
    acc.add_argument("--epochs", type=int, default=3)
    acc.add_argument("--train-subset", type=int, default=20000)
    acc.add_argument("--test-subset", type=int, default=10000)
    acc.add_argument("--batch-size", type=int, default=128)
    acc.add_argument("--lr", type=float, default=0.1)
    acc.add_argument("--seeds", type=int, nargs="+", default=[0])
    acc.add_argument("--arms", nargs="+", choices=list(ARMS), default=["synflow-macs", "synflow", "uniform",
                                                                        "unstructured"])
    acc.add_argument("--channel-multiple", type=int, default=8,
                     help="PreCropping arms: kept channel counts rounded to a multiple of this (ctprune's default 8)")
    acc.add_argument("--keep-branches", action="store_true",
                     help="PreCropping arms: never drop residual branches whole (ctprune's --keep-branches)")
    acc.add_argument("--quiet", action="store_true")
    spd = sub.add_parser("speed")
    spd.add_argument("--repeats", type=int, default=50)
    spd.add_argument("--pai", default="synflow-macs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    print(accuracy(args) if args.what == "accuracy" else speed(args))


if __name__ == "__main__":
    main()
