"""Atomic model writes: a temporary file beside the target, then a rename, so a failed run leaves no partial file."""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile

import onnx

from ctprune.errors import CtpruneError

# Above this, weights go to a side file (protobuf's 2 GB limit); ctprune's outputs are normally far smaller.
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def default_output_path(model_path: str | os.PathLike) -> pathlib.Path:
    """MODEL.onnx -> MODEL.ctprune.onnx beside it."""
    path = pathlib.Path(model_path)
    stem = path.name[:-5] if path.name.endswith(".onnx") else path.name
    return path.with_name(stem + ".ctprune.onnx")


def check_output_path(output: str | os.PathLike, model_path: str | os.PathLike | None) -> pathlib.Path:
    """Refuse to overwrite the input and to write into a folder that does not exist — before any work is done."""
    out = pathlib.Path(output)
    if model_path is not None and isinstance(model_path, (str, os.PathLike)):
        src = pathlib.Path(model_path)
        if out.exists() and src.exists() and out.resolve() == src.resolve():
            raise CtpruneError(f"the output {str(out)!r} is the input model; ctprune never overwrites its input.")
    if not out.parent.exists() and str(out.parent) not in ("", "."):
        raise CtpruneError(f"cannot write {str(out)!r}: the folder {str(out.parent)!r} does not exist.")
    if out.is_dir():
        raise CtpruneError(f"cannot write {str(out)!r}: it is a folder.")
    return out


@contextlib.contextmanager
def _atomic(output: str | os.PathLike):
    """Yield a temporary path beside `output`; on success it replaces `output`, on any failure it is removed."""
    out = pathlib.Path(output)
    fd, tmp = tempfile.mkstemp(prefix="." + out.name + ".", suffix=".tmp", dir=str(out.parent) or ".")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_model_atomic(model: onnx.ModelProto, output: str | os.PathLike) -> pathlib.Path:
    if model.ByteSize() > _EXTERNAL_DATA_THRESHOLD:
        raise CtpruneError(f"the pruned model is over {_EXTERNAL_DATA_THRESHOLD} bytes; external data is not supported yet.")
    with _atomic(output) as tmp:
        onnx.save_model(model, tmp)
    return pathlib.Path(output)


def write_json_atomic(data: str, output: str | os.PathLike) -> pathlib.Path:
    with _atomic(output) as tmp:
        pathlib.Path(tmp).write_text(data)
    return pathlib.Path(output)
