"""The fine-tuning loop: distil the dense model into the student (pruning hooks plug in), checkpoint, resume.

    result = fine_tune(student, teacher, train=load_data("train.npz", shape), eval=..., epochs=2, batch_size=64,
                       lr=0.01, hooks=pruner, checkpoint_dir="run/")

The student (any nn.Module; ctprune passes the lifted ONNX graph) is trained in place. Every epoch ends with a
checkpoint; Ctrl-C (SIGINT) or SIGTERM mid-epoch finishes the current step, saves, and raises KeyboardInterrupt;
`resume=True` continues from the checkpoint and, on the same machine and settings, ends with the same weights as an
uninterrupted run. Under torchrun the run is data-parallel (see distributed.py); `batch_size` is the global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import signal
import threading
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from ctprune.errors import BackendError, DataError
from ctprune.train import distributed as dist_util
from ctprune.train.backends import wrap_for_backend
from ctprune.train.checkpoint import (CheckpointError, checkpoint_path, load_checkpoint, rng_state,
                                      save_checkpoint, set_rng_state)
from ctprune.train.data import Dataset
from ctprune.train.distill import as_logits, combined_loss, looks_like_probabilities
from ctprune.train.hooks import TrainHooks

__all__ = ["TrainResult", "fine_tune", "evaluate", "resolve_device"]

log = logging.getLogger(__name__)
# Gradient-norm clip: keeps fine-tuning of BN-folded exports (no normalisation left to absorb a large step) stable.
GRAD_CLIP_NORM = 5.0
# Teacher outputs for the whole training set are computed once when they fit in this many bytes.
TEACHER_CACHE_BYTES = 1 << 30


@dataclasses.dataclass
class TrainResult:
    """What a fine-tune did: time, per-epoch history, final evaluation."""

    seconds: float
    history: list[dict]
    accuracy: float | None
    agreement: float | None
    epochs: int
    steps: int
    device: str
    backend: str
    world_size: int = 1
    synthetic: bool = False
    resumed_from: dict | None = None

    def report(self) -> dict:
        """The `train` section of ctprune's report."""
        return {"epochs": self.epochs, "seconds": round(self.seconds, 2), "backend": self.backend,
                "device": self.device, "steps": self.steps, "world_size": self.world_size,
                "synthetic_data": self.synthetic, "history": self.history}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' → CUDA when present, else CPU; asking for CUDA without one is a BackendError."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu.")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", dist_util.local_rank() if dist_util.env_world_size() > 1 else 0)
    return dev


def _as_dataset(data, what: str) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, tuple) and len(data) == 2:
        x, y = data
        return Dataset(x=np.asarray(x), y=None if y is None else np.asarray(y))
    if isinstance(data, (np.ndarray, torch.Tensor)):
        return Dataset(x=np.asarray(data))
    raise DataError(f"{what} data must be a ctprune Dataset, an (x, y) pair or an array; got {type(data).__name__}.")


def first_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _predictions(output: torch.Tensor) -> torch.Tensor:
    return output.argmax(1)


@torch.no_grad()
def evaluate(module: nn.Module, data, batch_size: int = 256, agreement_with=None, device=None,
             shard: bool = False) -> dict:
    """Top-1 accuracy on labelled data and top-1 agreement with `agreement_with` (a model, or its predictions).

    Returns {"accuracy": float | None, "agreement": float | None, "samples": int}. With `shard=True` under torchrun
    each rank evaluates a slice and the counts are summed.
    """
    data = _as_dataset(data, "evaluation")
    dev = resolve_device(device) if device is not None else next(module.parameters(), torch.empty(0)).device
    indices = np.arange(len(data))
    if shard and dist_util.is_distributed():
        indices = indices[dist_util.rank():: dist_util.world_size()]
    was_training = module.training
    module.eval()
    reference_model = agreement_with if isinstance(agreement_with, nn.Module) else None
    if reference_model is not None:
        reference_model.eval()
    correct = agree = positions = labelled = 0
    for start in range(0, len(indices), batch_size):
        idx = indices[start: start + batch_size]
        x = torch.from_numpy(data.x[idx]).to(dev)
        pred = _predictions(first_output(module(x)))
        if data.y is not None and pred.ndim == 1:
            correct += (pred.cpu() == torch.from_numpy(data.y[idx])).sum().item()
            labelled += len(idx)
        if agreement_with is not None:
            ref = (_predictions(first_output(reference_model(x))) if reference_model is not None
                   else torch.as_tensor(agreement_with)[torch.from_numpy(idx)])
            agree += (pred.cpu() == ref.cpu()).sum().item()
            positions += pred.numel()
    module.train(was_training)
    correct, labelled, agree, positions = dist_util.all_reduce_sum(
        [correct, labelled, agree, positions], dev if dev.type == "cuda" else None) if shard else (
        correct, labelled, agree, positions)
    return {"accuracy": correct / labelled if labelled else None,
            "agreement": agree / positions if positions else None,
            "samples": len(data)}


class _InterruptGuard:
    """Turns SIGINT/SIGTERM into a request honoured at the next step boundary; a second SIGINT stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupted: saving a checkpoint after this step (Ctrl-C again to stop at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class _TeacherOutputs:
    """Teacher logits per training sample: computed once in fixed chunks when they fit in memory (the same values
    on every run, so resumed runs match), else per batch."""

    def __init__(self, teacher, data: Dataset, device, batch_size: int, quiet: bool):
        self.teacher, self.data, self.device = teacher, data, device
        self.cache = None
        self.probabilities = False
        if teacher is None:
            return
        teacher.eval()
        with torch.no_grad():
            probe = first_output(teacher(torch.from_numpy(data.x[:2]).to(device)))
        self.probabilities = looks_like_probabilities(probe)
        if self.probabilities:
            log.info("the model outputs probabilities (ends in Softmax): distilling on their logarithms")
        if probe[0].numel() * 4 * len(data) > TEACHER_CACHE_BYTES:
            return
        chunks = range(0, len(data), batch_size)
        parts = []
        with torch.no_grad():
            for start in tqdm(chunks, desc="teacher outputs", unit="batch", disable=quiet, leave=False):
                x = torch.from_numpy(data.x[start: start + batch_size]).to(device)
                parts.append(as_logits(first_output(teacher(x)), self.probabilities).cpu())
        self.cache = torch.cat(parts)

    def __call__(self, idx: torch.Tensor, x: torch.Tensor):
        if self.teacher is None:
            return None
        if self.cache is not None:
            return self.cache[idx].to(self.device, non_blocking=True)
        with torch.no_grad():
            return as_logits(first_output(self.teacher(x)), self.probabilities)


def _optimizer(student: nn.Module, lr: float, momentum: float, weight_decay: float):
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise DataError("the model has no trainable parameters to fine-tune.")
    # Weight decay on weights (matrices, kernels) only, not on biases and normalisation scales.
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=momentum, nesterov=momentum > 0)


def _cosine(total_steps: int, floor: float = 0.01):
    def factor(step: int) -> float:
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    return factor


def fine_tune(student: nn.Module, teacher: nn.Module | None = None, train=None, eval=None, *, epochs: int = 1,
              batch_size: int = 64, lr: float = 0.01, device="auto", hooks: TrainHooks | None = None, seed: int = 0,
              checkpoint_dir=None, resume: bool = False, quiet: bool = False, backend: str = "torch",
              temperature: float = 4.0, alpha: float = 0.7, momentum: float = 0.9, weight_decay: float = 5e-4,
              eval_batch_size: int = 256) -> TrainResult:
    """Fine-tune `student` in place by distilling `teacher` (plus cross-entropy on labels, weight `1 - alpha`).

    SGD with Nesterov momentum and a per-step cosine learning rate; `batch_size` is the global batch (split over
    torchrun's processes). Without labels the loss is distillation only; without a teacher, cross-entropy only.
    """
    if train is None:
        raise DataError("fine_tune needs training data (a Dataset, e.g. from load_data or synthetic_data).")
    train = _as_dataset(train, "training")
    eval_data = _as_dataset(eval, "evaluation") if eval is not None else None
    if teacher is None and not train.has_labels:
        raise DataError(f"{train.source or 'training data'} has no labels and there is no teacher to distil from.")
    if epochs < 0 or batch_size < 1:
        raise DataError(f"epochs must be >= 0 and batch size >= 1 (got {epochs}, {batch_size}).")
    hooks = hooks or TrainHooks()
    dev = resolve_device(device)
    distributed = dist_util.init_from_env(dev.type)
    world, main = dist_util.world_size(), dist_util.is_main_process()
    torch.manual_seed(seed + dist_util.rank())
    np.random.seed(seed + dist_util.rank())
    random.seed(seed + dist_util.rank())

    # Steps: DistributedSampler(drop_last) gives each rank len // world samples; each rank takes batch // world.
    per_rank = len(train) // world
    rank_batch = max(1, min(batch_size // world, per_rank))
    steps_per_epoch = per_rank // rank_batch
    if steps_per_epoch == 0:
        raise DataError(f"{train.source or 'training data'}: {len(train)} samples are too few for {world} processes.")
    total_steps = epochs * steps_per_epoch
    config = {"epochs": epochs, "batch_size": batch_size, "samples": len(train), "steps_per_epoch": steps_per_epoch,
              "seed": seed, "lr": lr, "world_size": world}

    student.to(dev)
    if teacher is not None:
        teacher.to(dev).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    sample = torch.from_numpy(train.x[:1]).to(dev)
    model = wrap_for_backend(student, backend, sample)
    if distributed:
        model = dist_util.wrap_ddp(model, dev)
    optimizer = _optimizer(student, lr, momentum, weight_decay)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(total_steps))
    sampler = DistributedSampler(train, num_replicas=world, rank=dist_util.rank(), shuffle=True, seed=seed,
                                 drop_last=True)

    start_epoch, start_step, history, resumed_from = 0, 0, [], None
    if resume and checkpoint_dir is not None:
        state = load_checkpoint(checkpoint_dir)
        if state is None:
            log.info("no checkpoint in %s: starting from the beginning", checkpoint_dir)
        else:
            different = {k: (state["config"].get(k), v) for k, v in config.items() if state["config"].get(k) != v}
            if different:
                shown = ", ".join(f"{k} {a} (checkpoint) vs {b} (now)" for k, (a, b) in different.items())
                raise CheckpointError(f"{checkpoint_path(checkpoint_dir)} was written with other settings: {shown}. "
                                      "Resume with the same settings, or delete the checkpoint to start over.")
            student.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            hooks.load_state_dict(state["hooks"])
            set_rng_state(state["rng"])
            start_epoch, start_step, history = state["epoch"], state["step_in_epoch"], state["history"]
            resumed_from = {"epoch": start_epoch, "step_in_epoch": start_step}
            log.info("resuming from %s at epoch %d, step %d", checkpoint_path(checkpoint_dir), start_epoch + 1,
                     start_step)

    def save(epoch: int, step_in_epoch: int, rng: dict | None = None) -> None:
        if checkpoint_dir is None or not main:
            return
        save_checkpoint(checkpoint_dir, {
            "config": config, "epoch": epoch, "step_in_epoch": step_in_epoch, "history": history,
            "model": student.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "hooks": hooks.state_dict(), "rng": rng or rng_state()})

    teacher_out = _TeacherOutputs(teacher, train, dev, eval_batch_size, quiet or not main) if epochs else None
    eval_reference = None
    if eval_data is not None and teacher is not None:
        # The teacher's eval predictions never change: compute them once.
        eval_reference = _eval_predictions(teacher, eval_data, eval_batch_size, dev)

    x_all = torch.from_numpy(train.x)
    y_all = torch.from_numpy(train.y) if train.has_labels else None
    hooks.begin(total_steps, steps_per_epoch)
    started = time.perf_counter()
    with _InterruptGuard() as interrupt:
        for epoch in range(start_epoch, epochs):
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler), dtype=torch.long)
            first = start_step if epoch == start_epoch else 0
            model.train()
            bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                       disable=quiet or not main, dynamic_ncols=True, mininterval=1.0)
            loss_sum, hits, seen, epoch_start = 0.0, 0, 0, time.perf_counter()
            for s in range(first, steps_per_epoch):
                step = epoch * steps_per_epoch + s
                idx = order[s * rank_batch: (s + 1) * rank_batch]
                x = x_all[idx].to(dev, non_blocking=True)
                step_rng = rng_state()  # so a checkpoint taken inside this step replays it exactly
                try:
                    out = first_output(model(x))
                    probabilities = teacher_out.probabilities if teacher is not None else looks_like_probabilities(out)
                    logits = as_logits(out, probabilities)
                    target = teacher_out(idx, x)
                    labels = y_all[idx].to(dev) if y_all is not None else None
                    loss = combined_loss(logits, target, labels, temperature, alpha)
                    if not torch.isfinite(loss):
                        raise DataError(
                            f"training diverged at step {step} (the loss is {loss.item()}): lower the learning rate "
                            f"(--lr, now {lr:g}); models whose BatchNormalization was folded at export need a small one."
                        )
                    extra = hooks.extra_loss(step)
                    total = loss + extra if extra is not None else loss
                    optimizer.zero_grad(set_to_none=True)
                    total.backward()
                    hooks.after_backward(step)  # importance sees the raw gradient, before clipping
                    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP_NORM)
                    optimizer.step()
                    scheduler.step()
                    hooks.after_step(step)
                except KeyboardInterrupt:
                    # Raised inside the step (not via our signal handler): the step may be half done.
                    log.warning("interrupted inside step %d: the checkpoint resumes at this step", step)
                    save(epoch, s, step_rng)
                    bar.close()
                    raise
                loss_sum += loss.item()
                if logits.ndim == 2:
                    reference = labels if labels is not None else (target.argmax(1) if target is not None else None)
                    if reference is not None:
                        hits += (logits.argmax(1) == reference).sum().item()
                        seen += len(idx)
                bar.update(1)
                if s % 10 == 0 or s == steps_per_epoch - 1:
                    postfix = {"loss": f"{loss_sum / (s - first + 1):.4f}"}
                    if seen:
                        postfix["acc" if labels is not None else "agree"] = f"{hits / seen:.3f}"
                    bar.set_postfix(postfix, refresh=False)
                if interrupt.requested:
                    save(epoch, s + 1)
                    bar.close()
                    raise KeyboardInterrupt
            bar.close()
            hooks.end_epoch(epoch)
            entry = {"epoch": epoch + 1, "loss": loss_sum / max(steps_per_epoch - first, 1),
                     "train_accuracy" if train.has_labels else "train_agreement": hits / seen if seen else None,
                     "seconds": time.perf_counter() - epoch_start, "lr": scheduler.get_last_lr()[0]}
            if eval_data is not None:
                metrics = evaluate(student, eval_data, eval_batch_size, eval_reference, dev, shard=distributed)
                entry.update(eval_accuracy=metrics["accuracy"], eval_agreement=metrics["agreement"])
            history.append(entry)
            if main:
                log.info("epoch %d/%d: %s", epoch + 1, epochs,
                         ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if isinstance(v, float)))
            save(epoch + 1, 0)
            if interrupt.requested:
                raise KeyboardInterrupt
    seconds = time.perf_counter() - started

    final = {"accuracy": None, "agreement": None}
    if eval_data is not None:
        if history and "eval_accuracy" in history[-1] and start_epoch < epochs:
            final = {"accuracy": history[-1]["eval_accuracy"], "agreement": history[-1]["eval_agreement"]}
        else:
            final = evaluate(student, eval_data, eval_batch_size, eval_reference, dev, shard=distributed)
    student.eval()
    return TrainResult(seconds=seconds, history=history, accuracy=final["accuracy"], agreement=final["agreement"],
                       epochs=epochs, steps=total_steps, device=str(dev), backend=backend, world_size=world,
                       synthetic=train.synthetic, resumed_from=resumed_from)


@torch.no_grad()
def _eval_predictions(model: nn.Module, data: Dataset, batch_size: int, device) -> torch.Tensor:
    model.eval()
    preds = [_predictions(first_output(model(torch.from_numpy(data.x[i: i + batch_size]).to(device)))).cpu()
             for i in range(0, len(data), batch_size)]
    return torch.cat(preds)
