"""Training backends: plain PyTorch, or onnxruntime-training's ORTModule where the environment still has one.

ORTModule is deprecated upstream (last release 1.19.2, 2024-09; it breaks on torch >= 2.7), so it is an adapter: it
is used only when it imports and runs a forward pass here; otherwise a `BackendError` says why.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ctprune.errors import BackendError

__all__ = ["BACKENDS", "wrap_for_backend", "ortmodule_class"]

log = logging.getLogger(__name__)
BACKENDS = ("torch", "ortmodule")
_WHY_DEPRECATED = ("ORTModule (onnxruntime-training) is deprecated upstream: its last release is 1.19.2 and it does "
                   "not support torch >= 2.7. Use --backend torch (the default).")


def ortmodule_class():
    """onnxruntime.training.ortmodule.ORTModule, or a BackendError saying why it cannot be had."""
    try:
        from onnxruntime.training.ortmodule import ORTModule
    except Exception as exc:  # ImportError, or the package failing during its own import
        raise BackendError(
            f"--backend ortmodule needs onnxruntime-training's ORTModule, which cannot be imported here "
            f"({type(exc).__name__}: {exc}). {_WHY_DEPRECATED}"
        ) from exc
    return ORTModule


def wrap_for_backend(module: nn.Module, backend: str, sample_input: torch.Tensor | None = None) -> nn.Module:
    """`module` itself for 'torch'; ORTModule(module) for 'ortmodule', checked with one forward pass."""
    if backend == "torch":
        return module
    if backend != "ortmodule":
        raise BackendError(f"unknown training backend {backend!r}; choose one of: {', '.join(BACKENDS)}.")
    wrapped = ortmodule_class()(module)
    if sample_input is not None:
        try:
            wrapped(sample_input)
        except Exception as exc:
            raise BackendError(
                f"ORTModule imported but failed on this model with torch {torch.__version__} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). {_WHY_DEPRECATED}"
            ) from exc
    log.info("training through ORTModule")
    return wrapped
