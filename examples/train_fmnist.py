"""Train the two Fashion-MNIST example networks and export them as ONNX (examples/models/).

    nice .venv/bin/python examples/train_fmnist.py                 # both nets
    nice .venv/bin/python examples/train_fmnist.py --net resnet20 --epochs 5

Short on purpose (a shared 2-core machine): SGD with Nesterov momentum, a one-cycle learning rate, horizontal flips,
channels-last tensors. Each net is exported with torch.onnx.export (TorchScript exporter, opset 17, dynamic batch) and
the ONNX file is checked against torch on the test set before it is written.
"""

import argparse
import json
import logging
import pathlib
import sys
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from examples.fmnist import ResNet20, VGGNet, load_fmnist  # noqa: E402

MODELS_DIR = pathlib.Path(__file__).resolve().parent / "models"
NETS = {"resnet20": (ResNet20, "resnet20_fmnist.onnx"), "vgg": (VGGNet, "vgg_fmnist.onnx")}
log = logging.getLogger("train_fmnist")


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = x[i : i + batch].contiguous(memory_format=torch.channels_last)
            correct += (model(xb).argmax(1) == y[i : i + batch]).sum().item()
    return correct / len(x)


def train(name: str, epochs: int, batch_size: int, lr: float, seed: int, data) -> tuple[nn.Module, dict]:
    (x_train, y_train), (x_test, y_test) = data
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = NETS[name][0]().to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]  # BN and biases: no weight decay
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, momentum=0.9, nesterov=True,
    )
    steps_per_epoch = len(x_train) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.25)
    history, start = [], time.time()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"{name} epoch {epoch + 1}/{epochs}", mininterval=5)
        total = 0.0
        for step in bar:
            idx = order[step * batch_size : (step + 1) * batch_size]
            xb, yb = x_train[idx], y_train[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb).contiguous(memory_format=torch.channels_last)
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{total / (step + 1):.3f}")
        acc = accuracy(model, x_test, y_test)
        history.append({"epoch": epoch + 1, "loss": total / steps_per_epoch, "test_accuracy": acc,
                        "seconds": time.time() - start})
        log.info("%s epoch %d: loss %.4f, test accuracy %.4f, %.0f s", name, epoch + 1, total / steps_per_epoch,
                 acc, time.time() - start)
    return model.to(memory_format=torch.contiguous_format).eval(), {"history": history, "seconds": time.time() - start}


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
    parser.add_argument("--lr", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    (xtr, ytr), (xte, yte) = load_fmnist("train"), load_fmnist("test")
    data = ((torch.from_numpy(xtr), torch.from_numpy(ytr)), (torch.from_numpy(xte), torch.from_numpy(yte)))
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    names = list(NETS) if args.net == "all" else [args.net]
    for name in names:
        model, info = train(name, args.epochs, args.batch_size, args.lr, args.seed, data)
        path = MODELS_DIR / NETS[name][1]
        diff = export(model, path, data[1][0])
        info.update(net=name, file=path.name, bytes=path.stat().st_size, onnx_vs_torch_max_abs=diff,
                    test_accuracy=info["history"][-1]["test_accuracy"], epochs=args.epochs,
                    batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads)
        (MODELS_DIR / f"{path.stem}.json").write_text(json.dumps(info, indent=1) + "\n")
        log.info("wrote %s (%d bytes, test accuracy %.4f, onnx vs torch %.2e)", path, info["bytes"],
                 info["test_accuracy"], diff)


if __name__ == "__main__":
    main()
