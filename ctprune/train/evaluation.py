"""Device choice, input coercion and top-1 evaluation, shared by the fine-tuning loop and the pipeline.

    metrics = evaluate(student, load_data("val.npz", shape), agreement_with=teacher)   # {"accuracy", "agreement", ...}
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ctprune.errors import BackendError, DataError
from ctprune.train import distributed as dist_util
from ctprune.train.data import Dataset

__all__ = ["as_dataset", "eval_predictions", "evaluate", "first_output", "resolve_device"]


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


def as_dataset(data, what: str) -> Dataset:
    """`data` as a Dataset: one already, an (x, y) pair, or inputs alone; `what` names it in the error."""
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
    data = as_dataset(data, "evaluation")
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


@torch.no_grad()
def eval_predictions(model: nn.Module, data: Dataset, batch_size: int, device) -> torch.Tensor:
    """`model`'s top-1 prediction for every sample of `data`, on the CPU."""
    model.eval()
    preds = [_predictions(first_output(model(torch.from_numpy(data.x[i: i + batch_size]).to(device)))).cpu()
             for i in range(0, len(data), batch_size)]
    return torch.cat(preds)
