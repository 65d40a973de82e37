"""The fine-tuning loop: distil the dense model into the student (pruning hooks plug in), checkpoint, resume.

    result = fine_tune(student, teacher, train=load_data("train.npz", shape), eval=..., epochs=2, batch_size=64,
                       lr=0.01, hooks=pruner, checkpoint_dir="run/")

The student (any nn.Module; ctprune passes the lifted ONNX graph) is trained in place. Every epoch ends with a
checkpoint; Ctrl-C (SIGINT) or SIGTERM mid-epoch finishes the current step, saves, and raises KeyboardInterrupt;
`resume=True` continues from the checkpoint and, on the same machine and settings, ends with the same weights as an
uninterrupted run. Under torchrun the run is data-parallel (see distributed.py); `batch_size` is the global batch.
"""

from __future__ import annotations

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

from ctprune.errors import DataError
from ctprune.train import distributed as dist_util
from ctprune.train.backends import wrap_for_backend
from ctprune.train.checkpoint import (CheckpointError, checkpoint_path, load_checkpoint, rng_state,
                                      save_checkpoint, set_rng_state)
from ctprune.train.data import Dataset
from ctprune.train.distill import as_logits, combined_loss, looks_like_probabilities
from ctprune.train.evaluation import as_dataset, eval_predictions, evaluate, first_output, resolve_device
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


@dataclasses.dataclass
class _Settings:
    """fine_tune's keyword arguments, less the device and the hooks."""

    epochs: int
    batch_size: int
    lr: float
    seed: int
    backend: str
    temperature: float
    alpha: float
    momentum: float
    weight_decay: float
    eval_batch_size: int
    checkpoint_dir: object
    quiet: bool


@dataclasses.dataclass
class _EpochTally:
    """Running loss and top-1 hits of one epoch, from step `first` on."""

    first: int
    started: float
    loss_sum: float = 0.0
    hits: int = 0
    seen: int = 0

    def add(self, loss, logits, target, labels, count: int) -> None:
        self.loss_sum += loss.item()
        if logits.ndim == 2:
            reference = labels if labels is not None else (target.argmax(1) if target is not None else None)
            if reference is not None:
                self.hits += (logits.argmax(1) == reference).sum().item()
                self.seen += count

    def postfix(self, s: int, labelled: bool) -> dict:
        shown = {"loss": f"{self.loss_sum / (s - self.first + 1):.4f}"}
        if self.seen:
            shown["acc" if labelled else "agree"] = f"{self.hits / self.seen:.3f}"
        return shown


class _Trainer:
    """One fine-tuning run: the state set up in __init__, `resume`, `run_epochs`, then `finish`."""

    def __init__(self, student: nn.Module, teacher, train: Dataset, eval_data, settings: _Settings,
                 hooks: TrainHooks, dev: torch.device):
        self.student, self.teacher, self.train, self.eval_data = student, teacher, train, eval_data
        self.settings, self.hooks, self.dev = settings, hooks, dev
        self.distributed = dist_util.init_from_env(dev.type)
        self.world, self.main = dist_util.world_size(), dist_util.is_main_process()
        seed = settings.seed
        torch.manual_seed(seed + dist_util.rank())
        np.random.seed(seed + dist_util.rank())
        random.seed(seed + dist_util.rank())

        # Steps: DistributedSampler(drop_last) gives each rank len // world samples; each rank takes batch // world.
        per_rank = len(train) // self.world
        self.rank_batch = max(1, min(settings.batch_size // self.world, per_rank))
        self.steps_per_epoch = per_rank // self.rank_batch
        if self.steps_per_epoch == 0:
            raise DataError(f"{train.source or 'training data'}: {len(train)} samples are too few for "
                            f"{self.world} processes.")
        self.total_steps = settings.epochs * self.steps_per_epoch
        self.config = {"epochs": settings.epochs, "batch_size": settings.batch_size, "samples": len(train),
                       "steps_per_epoch": self.steps_per_epoch, "seed": seed, "lr": settings.lr,
                       "world_size": self.world}

        student.to(dev)
        if teacher is not None:
            teacher.to(dev).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.model = wrap_for_backend(student, settings.backend, torch.from_numpy(train.x[:1]).to(dev))
        if self.distributed:
            self.model = dist_util.wrap_ddp(self.model, dev)
        self.optimizer = _optimizer(student, settings.lr, settings.momentum, settings.weight_decay)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _cosine(self.total_steps))
        self.sampler = DistributedSampler(train, num_replicas=self.world, rank=dist_util.rank(), shuffle=True,
                                          seed=seed, drop_last=True)
        self.x_all = torch.from_numpy(train.x)
        self.y_all = torch.from_numpy(train.y) if train.has_labels else None
        self.start_epoch, self.start_step, self.history, self.resumed_from = 0, 0, [], None
        self.teacher_out = self.eval_reference = None

    def resume(self) -> None:
        """Continue from the checkpoint in checkpoint_dir, if there is one written with the same settings."""
        checkpoint_dir = self.settings.checkpoint_dir
        state = load_checkpoint(checkpoint_dir)
        if state is None:
            log.info("no checkpoint in %s: starting from the beginning", checkpoint_dir)
            return
        different = {k: (state["config"].get(k), v) for k, v in self.config.items() if state["config"].get(k) != v}
        if different:
            shown = ", ".join(f"{k} {a} (checkpoint) vs {b} (now)" for k, (a, b) in different.items())
            raise CheckpointError(f"{checkpoint_path(checkpoint_dir)} was written with other settings: {shown}. "
                                  "Resume with the same settings, or delete the checkpoint to start over.")
        self.student.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.hooks.load_state_dict(state["hooks"])
        set_rng_state(state["rng"])
        self.start_epoch, self.start_step, self.history = state["epoch"], state["step_in_epoch"], state["history"]
        self.resumed_from = {"epoch": self.start_epoch, "step_in_epoch": self.start_step}
        log.info("resuming from %s at epoch %d, step %d", checkpoint_path(checkpoint_dir), self.start_epoch + 1,
                 self.start_step)

    def save(self, epoch: int, step_in_epoch: int, rng: dict | None = None) -> None:
        if self.settings.checkpoint_dir is None or not self.main:
            return
        save_checkpoint(self.settings.checkpoint_dir, {
            "config": self.config, "epoch": epoch, "step_in_epoch": step_in_epoch, "history": self.history,
            "model": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "hooks": self.hooks.state_dict(), "rng": rng or rng_state()})

    def prepare_targets(self) -> None:
        """Teacher outputs on the training set and, once, the teacher's predictions on the evaluation set."""
        settings = self.settings
        if settings.epochs:
            self.teacher_out = _TeacherOutputs(self.teacher, self.train, self.dev, settings.eval_batch_size,
                                               settings.quiet or not self.main)
        if self.eval_data is not None and self.teacher is not None:
            # The teacher's eval predictions never change: compute them once.
            self.eval_reference = eval_predictions(self.teacher, self.eval_data, settings.eval_batch_size,
                                                    self.dev)

    def run_epochs(self) -> float:
        """Train from the start (or resume) point to the last epoch; the seconds it took."""
        self.hooks.begin(self.total_steps, self.steps_per_epoch)
        started = time.perf_counter()
        with _InterruptGuard() as interrupt:
            for epoch in range(self.start_epoch, self.settings.epochs):
                tally = self._run_epoch(epoch, interrupt)
                self._end_epoch(epoch, tally)
                if interrupt.requested:
                    raise KeyboardInterrupt
        return time.perf_counter() - started

    def _run_epoch(self, epoch: int, interrupt: _InterruptGuard) -> _EpochTally:
        settings = self.settings
        self.sampler.set_epoch(epoch)
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        first = self.start_step if epoch == self.start_epoch else 0
        self.model.train()
        bar = tqdm(total=self.steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{settings.epochs}",
                   unit="step", disable=settings.quiet or not self.main, dynamic_ncols=True, mininterval=1.0)
        tally = _EpochTally(first, time.perf_counter())
        for s in range(first, self.steps_per_epoch):
            step = epoch * self.steps_per_epoch + s
            idx = order[s * self.rank_batch: (s + 1) * self.rank_batch]
            x = self.x_all[idx].to(self.dev, non_blocking=True)
            step_rng = rng_state()  # so a checkpoint taken inside this step replays it exactly
            try:
                loss, logits, target, labels = self._step(step, idx, x)
            except KeyboardInterrupt:
                # Raised inside the step (not via our signal handler): the step may be half done.
                log.warning("interrupted inside step %d: the checkpoint resumes at this step", step)
                self.save(epoch, s, step_rng)
                bar.close()
                raise
            tally.add(loss, logits, target, labels, len(idx))
            bar.update(1)
            if s % 10 == 0 or s == self.steps_per_epoch - 1:
                bar.set_postfix(tally.postfix(s, labels is not None), refresh=False)
            if interrupt.requested:
                self.save(epoch, s + 1)
                bar.close()
                raise KeyboardInterrupt
        bar.close()
        return tally

    def _step(self, step: int, idx: torch.Tensor, x: torch.Tensor):
        """One optimisation step; returns (distillation/label loss, student logits, teacher logits, labels)."""
        settings = self.settings
        out = first_output(self.model(x))
        probabilities = self.teacher_out.probabilities if self.teacher is not None else looks_like_probabilities(out)
        logits = as_logits(out, probabilities)
        target = self.teacher_out(idx, x)
        labels = self.y_all[idx].to(self.dev) if self.y_all is not None else None
        loss = combined_loss(logits, target, labels, settings.temperature, settings.alpha)
        if not torch.isfinite(loss):
            raise DataError(
                f"training diverged at step {step} (the loss is {loss.item()}): lower the learning rate (--lr, "
                f"now {settings.lr:g}); models whose BatchNormalization was folded at export need a small one."
            )
        extra = self.hooks.extra_loss(step)
        total = loss + extra if extra is not None else loss
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.hooks.after_backward(step)  # importance sees the raw gradient, before clipping
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP_NORM)
        self.optimizer.step()
        self.scheduler.step()
        self.hooks.after_step(step)
        return loss, logits, target, labels

    def _end_epoch(self, epoch: int, tally: _EpochTally) -> None:
        """Hooks' end of epoch, the history entry (with evaluation when there is eval data), the checkpoint."""
        self.hooks.end_epoch(epoch)
        train_key = "train_accuracy" if self.train.has_labels else "train_agreement"
        entry = {"epoch": epoch + 1, "loss": tally.loss_sum / max(self.steps_per_epoch - tally.first, 1),
                 train_key: tally.hits / tally.seen if tally.seen else None,
                 "seconds": time.perf_counter() - tally.started, "lr": self.scheduler.get_last_lr()[0]}
        if self.eval_data is not None:
            metrics = self._evaluate()
            entry.update(eval_accuracy=metrics["accuracy"], eval_agreement=metrics["agreement"])
        self.history.append(entry)
        if self.main:
            log.info("epoch %d/%d: %s", epoch + 1, self.settings.epochs,
                     ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if isinstance(v, float)))
        self.save(epoch + 1, 0)

    def _evaluate(self) -> dict:
        return evaluate(self.student, self.eval_data, self.settings.eval_batch_size, self.eval_reference, self.dev,
                        shard=self.distributed)

    def finish(self, seconds: float) -> TrainResult:
        """Final evaluation (the last epoch's when it ran in this call) and the result; the student left in eval mode."""
        final = {"accuracy": None, "agreement": None}
        if self.eval_data is not None:
            if self.history and "eval_accuracy" in self.history[-1] and self.start_epoch < self.settings.epochs:
                final = {"accuracy": self.history[-1]["eval_accuracy"],
                         "agreement": self.history[-1]["eval_agreement"]}
            else:
                final = self._evaluate()
        self.student.eval()
        return TrainResult(seconds=seconds, history=self.history, accuracy=final["accuracy"],
                           agreement=final["agreement"], epochs=self.settings.epochs, steps=self.total_steps,
                           device=str(self.dev), backend=self.settings.backend, world_size=self.world,
                           synthetic=self.train.synthetic, resumed_from=self.resumed_from)


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
    train = as_dataset(train, "training")
    eval_data = as_dataset(eval, "evaluation") if eval is not None else None
    if teacher is None and not train.has_labels:
        raise DataError(f"{train.source or 'training data'} has no labels and there is no teacher to distil from.")
    if epochs < 0 or batch_size < 1:
        raise DataError(f"epochs must be >= 0 and batch size >= 1 (got {epochs}, {batch_size}).")
    settings = _Settings(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, backend=backend,
                         temperature=temperature, alpha=alpha, momentum=momentum, weight_decay=weight_decay,
                         eval_batch_size=eval_batch_size, checkpoint_dir=checkpoint_dir, quiet=quiet)
    hooks = hooks or TrainHooks()
    trainer = _Trainer(student, teacher, train, eval_data, settings, hooks, resolve_device(device))
    if resume and checkpoint_dir is not None:
        trainer.resume()
    trainer.prepare_targets()
    seconds = trainer.run_epochs()
    return trainer.finish(seconds)
