"""Training checkpoints: one file per run directory, replaced atomically so an interrupt never leaves half a file.

A checkpoint holds the model, optimizer, scheduler and hooks state, every RNG state and the position (epoch, step
within the epoch). It is a local file written by ctprune for the same user, loaded with full unpickling.
"""

from __future__ import annotations

import logging
import os
import pathlib
import random
import tempfile

import numpy as np
import torch

from ctprune.errors import CtpruneError

__all__ = ["CheckpointError", "CHECKPOINT_NAME", "checkpoint_path", "save_checkpoint", "load_checkpoint",
           "rng_state", "set_rng_state"]

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "train_state.pt"


class CheckpointError(CtpruneError):
    """A checkpoint cannot be read, or belongs to a run with different settings."""


def checkpoint_path(directory) -> pathlib.Path:
    return pathlib.Path(directory) / CHECKPOINT_NAME


def save_checkpoint(directory, state: dict) -> pathlib.Path:
    """Write `state` to DIRECTORY/train_state.pt via a temporary file and a rename."""
    path = checkpoint_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".train_state.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    log.debug("checkpoint written: %s (epoch %s, step %s)", path, state.get("epoch"), state.get("step_in_epoch"))
    return path


def load_checkpoint(directory) -> dict | None:
    """The saved state, or None when the directory holds no checkpoint."""
    path = checkpoint_path(directory)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc}); delete it to start over.") from exc


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
