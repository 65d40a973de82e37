"""Training checkpoints: tensors and plain data only, one file per run folder, replaced atomically.

A checkpoint holds the model, optimizer, scheduler and hooks state, every RNG state and the position (epoch, step
within the epoch). Loading it executes nothing: before torch.load(weights_only=True) the pickle's opcodes are read
and any reference to a class or function other than the few that rebuild tensors and ordered dicts is refused, so a
file planted beside the output cannot run code when the user resumes.

The run folder (OUT.ckpt/) is marked as ctprune's by RUN_FILE, which also records the run's settings: `--resume`
compares them before any work, and only a marked folder is ever cleaned up, file by known file.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import pickletools
import random
import tempfile
import zipfile

import numpy as np
import torch

from ctprune.errors import CtpruneError

__all__ = ["CheckpointError", "CHECKPOINT_NAME", "RUN_FILE", "checkpoint_path", "save_checkpoint",
           "load_checkpoint", "rng_state", "set_rng_state", "prepare_run_folder", "remove_run_folder",
           "holds_checkpoint"]

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "train_state.pt"
RUN_FILE = "ctprune-run.json"  # marks a folder ctprune made, and holds the settings of the run that made it
_TEMP_PREFIX = ".train_state."
# What torch.save writes for a dict of tensors and plain data (pickle protocol 2: GLOBAL opcodes only).
_SAFE_GLOBALS = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2")}
_STATE_KEYS = ("config", "epoch", "step_in_epoch", "history", "model", "optimizer", "scheduler", "hooks", "rng")


class CheckpointError(CtpruneError):
    """A checkpoint cannot be read, is not plain data, or belongs to a run with different settings."""


def checkpoint_path(directory) -> pathlib.Path:
    return pathlib.Path(directory) / CHECKPOINT_NAME


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _plain(value, where: str = "state"):
    """`value` with numpy scalars as Python numbers; anything that is not a tensor or plain data is a bug here."""
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic) and value.ndim == 0 and value.dtype.kind in "biuf":
        return value.item()
    if isinstance(value, dict):
        return type(value)((k, _plain(v, f"{where}[{k!r}]")) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"internal error: checkpoint {where} is a {type(value).__name__}, not a tensor or plain data")


def save_checkpoint(directory, state: dict) -> pathlib.Path:
    """Write `state` to DIRECTORY/train_state.pt via a temporary file and a rename."""
    path = checkpoint_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = _plain(state)
    fd, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    log.debug("checkpoint written: %s (epoch %s, step %s)", path, state.get("epoch"), state.get("step_in_epoch"))
    return path


def _refuse(path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: {why}; ctprune does not load it. Delete {path.parent} to start over.")


def _check_pickle(path: pathlib.Path) -> None:
    """Refuse, without unpickling, any checkpoint whose pickle names a class or function beyond tensors' own."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith(".pkl")]
            if len(pickles) != 1 or not pickles[0].endswith("/data.pkl"):
                raise _refuse(path, "is not a checkpoint written by ctprune (unexpected archive layout)")
            data = archive.read(pickles[0])
    except (zipfile.BadZipFile, OSError, KeyError) as exc:
        raise _refuse(path, f"is not a checkpoint written by ctprune ({exc})") from None
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                if (module, name) in _SAFE_GLOBALS or (module == "torch" and name.endswith("Storage")):
                    continue
                raise _refuse(path, f"refers to {module}.{name}: a checkpoint holds only tensors and plain data, "
                                    "and loading this one could run code")
            if op.name in ("STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"):
                raise _refuse(path, f"uses the pickle opcode {op.name}, which ctprune never writes and which "
                                    "could run code")
    except ValueError as exc:  # pickletools on a truncated or garbled stream
        raise _refuse(path, f"is damaged ({exc})") from None


def load_checkpoint(directory) -> dict | None:
    """The saved state, or None when the directory holds no checkpoint. Nothing in the file is executed."""
    path = checkpoint_path(directory)
    if not path.exists():
        return None
    if not path.is_file():
        raise _refuse(path, "is not a regular file")
    _check_pickle(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _refuse(path, f"cannot be read ({first})") from None
    if not isinstance(state, dict) or any(k not in state for k in _STATE_KEYS) or not isinstance(state["config"], dict):
        raise _refuse(path, "does not hold a ctprune training state")
    return state


def rng_state() -> dict:
    """Every RNG's state as tensors and plain data (numpy's key array as an int64 tensor)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    python = state["python"]  # (version, tuple of ints, gauss): lists after a round trip through plain data
    random.setstate((python[0], tuple(python[1]), python[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the run folder ---------------------------------------------------------------------------------------------------
def _read_run_file(directory: pathlib.Path) -> dict | None:
    marker = directory / RUN_FILE
    if not marker.is_file():
        return None
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{marker}: cannot be read ({exc}); delete {directory} to start over.") from None
    return recorded if isinstance(recorded, dict) else {}


def _shown(value) -> str:
    return "none" if value is None else str(value)


def prepare_run_folder(directory, settings: dict, resume: bool) -> None:
    """Before any work: make sure DIRECTORY is ctprune's (or create and mark it), and on `resume` that it was written
    by a run with these `settings` (plain JSON values); every difference is named in one CheckpointError."""
    directory = pathlib.Path(directory)
    if directory.exists() or directory.is_symlink():
        if not directory.is_dir() or directory.is_symlink():
            raise CheckpointError(f"{directory} exists and is not a folder; ctprune keeps the run's checkpoint "
                                  "there: move it away or choose another --output.")
        recorded = _read_run_file(directory)
        if recorded is None:
            raise CheckpointError(f"{directory} exists and was not made by ctprune; ctprune keeps the run's "
                                  "checkpoint there (and removes it after the run): move that folder away or "
                                  "choose another --output.")
        if resume and holds_checkpoint(directory):
            saved = recorded.get("settings", {})
            different = [k for k in settings if saved.get(k) != settings[k]]
            if different:
                shown = "; ".join(f"{k} {_shown(saved.get(k))} (checkpoint) vs {_shown(settings[k])} (now)"
                                  for k in different)
                raise CheckpointError(f"{directory} holds a run with other settings: {shown}. Resume with the same "
                                      f"settings, or delete {directory} to start over.")
            return
    else:
        directory.mkdir()
    _write_run_file(directory, settings)


def _write_run_file(directory: pathlib.Path, settings: dict) -> None:
    marker = directory / RUN_FILE
    fd, tmp = tempfile.mkstemp(prefix="." + RUN_FILE + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"made_by": "ctprune", "settings": settings}, f, indent=1)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, marker)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def holds_checkpoint(directory) -> bool:
    """Whether DIRECTORY (or a stage folder inside it) holds a training state to resume from."""
    directory = pathlib.Path(directory)
    return directory.is_dir() and any(p.is_file() for p in directory.rglob(CHECKPOINT_NAME))


def remove_run_folder(directory) -> None:
    """Remove a run folder ctprune made: only its own files (checkpoints, their temporary files, the run file) and
    the folders they leave empty. A folder without ctprune's mark, and anything a user put inside, stay."""
    directory = pathlib.Path(directory)
    if directory.is_symlink() or not directory.is_dir() or not (directory / RUN_FILE).is_file():
        return
    for root, dirs, files in os.walk(directory, topdown=False):
        for name in files:
            if name in (CHECKPOINT_NAME, RUN_FILE) or (name.startswith((_TEMP_PREFIX, "." + RUN_FILE + "."))
                                                       and name.endswith(".tmp")):
                pathlib.Path(root, name).unlink(missing_ok=True)
        try:
            os.rmdir(root)
        except OSError:
            pass  # something of the user's is inside: it stays
