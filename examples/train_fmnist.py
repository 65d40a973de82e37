"""Train the Fashion-MNIST example networks and export them as ONNX (examples/models/).

    nice .venv/bin/python examples/train_fmnist.py                 # every net
    nice .venv/bin/python examples/train_fmnist.py --net resnet20 --epochs 5
    nice .venv/bin/python examples/train_fmnist.py --net mobilenetv2 --epochs 2   # the 1x1-heavy example

Short on purpose (a shared 2-core machine): ctprune's own training loop (ctprune.train.fine_tune) with cross-entropy
only, SGD with Nesterov momentum and a cosine learning rate, channels-last tensors; a checkpoint per epoch in
.deps/fmnist-train, so an interrupted run picks up where it stopped. Each net is exported with torch.onnx.export
(TorchScript exporter, opset 17, dynamic batch) and checked against torch on the test set before it is written.
"""

import argparse
import copy
import json
import logging
import pathlib
import sys

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from ctprune.train import Dataset, TrainHooks, fine_tune  # noqa: E402
from examples.fmnist import MobileNetV2, ResNet20, VGGNet, load_fmnist  # noqa: E402

MODELS_DIR = pathlib.Path(__file__).resolve().parent / "models"
CHECKPOINTS = pathlib.Path(__file__).resolve().parent.parent / ".deps" / "fmnist-train"
NETS = {"resnet20": (ResNet20, "resnet20_fmnist.onnx"), "vgg": (VGGNet, "vgg_fmnist.onnx"),
        "mobilenetv2": (MobileNetV2, "mobilenetv2_fmnist.onnx")}
log = logging.getLogger("train_fmnist")


class ChannelsLast(nn.Module):
    """Feeds the net channels-last tensors: oneDNN's convolutions run about 1.5x faster so on this CPU."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last)

    def forward(self, x):
        return self.net(x.contiguous(memory_format=torch.channels_last))


class ExportEachEpoch(TrainHooks):
    """Writes the ONNX file after every epoch, so a long run leaves a usable (provisional) model early."""

    def __init__(self, model: ChannelsLast, path: pathlib.Path, x_test: torch.Tensor):
        self.model, self.path, self.x_test = model, path, x_test

    def end_epoch(self, epoch: int) -> None:
        net = copy.deepcopy(self.model.net).to(memory_format=torch.contiguous_format).eval()
        export(net, self.path, self.x_test)
        log.info("provisional %s after epoch %d", self.path.name, epoch + 1)


def train(name: str, epochs: int, batch_size: int, lr: float, seed: int, train_data, test_data, quiet: bool):
    """Train from scratch with ctprune's own loop (cross-entropy, no teacher); resumable from .deps/fmnist-train."""
    torch.manual_seed(seed)
    model = ChannelsLast(NETS[name][0]())
    hooks = ExportEachEpoch(model, MODELS_DIR / NETS[name][1], torch.from_numpy(test_data.x))
    result = fine_tune(model, None, train=train_data, eval=test_data, epochs=epochs, batch_size=batch_size, lr=lr,
                       seed=seed, device="cpu", checkpoint_dir=CHECKPOINTS / name, resume=True, quiet=quiet,
                       hooks=hooks)
    return model.net.to(memory_format=torch.contiguous_format).eval(), result


def export(model: nn.Module, path: pathlib.Path, x_test: torch.Tensor) -> float:
    """Export to ONNX (opset 17, dynamic batch) and return the max |onnx - torch| on a test batch."""
    import onnx
    import onnxruntime as ort

    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(
        model, (x_test[:2],), str(tmp), dynamo=False, opset_version=17,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    onnx.checker.check_model(onnx.load(str(tmp)), full_check=True)
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    xb = x_test[:256]
    with torch.no_grad():
        ref = model(xb).numpy()
    got = sess.run(None, {"input": xb.numpy()})[0]
    tmp.replace(path)
    return float(np.abs(got - ref).max())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", choices=[*NETS, "all"], default="all")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    (xtr, ytr), (xte, yte) = load_fmnist("train"), load_fmnist("test")
    train_data, test_data = Dataset(xtr, ytr, "fashion-mnist train"), Dataset(xte, yte, "fashion-mnist test")
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    names = list(NETS) if args.net == "all" else [args.net]
    for name in names:
        model, result = train(name, args.epochs, args.batch_size, args.lr, args.seed, train_data, test_data,
                              args.quiet)
        path = MODELS_DIR / NETS[name][1]
        diff = export(model, path, torch.from_numpy(xte))
        info = {"net": name, "file": path.name, "bytes": path.stat().st_size, "test_accuracy": result.accuracy,
                "onnx_vs_torch_max_abs": diff, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                "seed": args.seed, "threads": args.threads, "train_seconds": round(result.seconds, 1),
                "history": result.history}
        (MODELS_DIR / f"{path.stem}.json").write_text(json.dumps(info, indent=1) + "\n")
        log.info("wrote %s (%d bytes, test accuracy %.4f, onnx vs torch %.2e)", path, info["bytes"],
                 result.accuracy, diff)


if __name__ == "__main__":
    main()
