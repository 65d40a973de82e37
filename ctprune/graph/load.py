"""Read an ONNX model from a path or bytes, with a clear error for everything a user can get wrong."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from ctprune.errors import ModelLoadError

__all__ = ["load_model", "MIN_OPSET", "MAX_OPSET", "default_opset"]

log = logging.getLogger(__name__)

MIN_OPSET, MAX_OPSET = 7, 22  # the default-domain opsets the interpreter's ops understand (9..21 are tested)


def load_model(source, input_shape=None, file_backed: bool = False) -> onnx.ModelProto:
    """Load and check a model. ``source``: a path (str/Path), raw bytes, or a ModelProto (copied).

    External data next to a path is loaded too; with ``file_backed`` (a path only) the large float weights, inline or
    external, stay in their files as references read one tensor at a time (filebacked.py). ``input_shape``
    (optional) is only validated here; normalize() applies it. The returned proto is the user's model, untouched,
    the base for write_back().
    """
    label, raw = "<bytes>", None
    if isinstance(source, onnx.ModelProto):
        model, label = onnx.ModelProto(), "<ModelProto>"
        model.CopyFrom(source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        raw = bytes(source)
        model = _parse(raw, label)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = str(path)
        if not path.exists():
            raise ModelLoadError(f"{label}: no such file")
        if path.is_dir():
            raise ModelLoadError(f"{label}: is a directory, not an ONNX file")
        if not path.is_file():  # a FIFO would block read_bytes forever: refuse it from its stat
            raise ModelLoadError(f"{label}: is not a regular file (a FIFO, device or socket); give the .onnx file")
        if file_backed:
            from ctprune.graph.filebacked import load_file_backed

            model = _nonempty(load_file_backed(path), label)
            raw = path  # the checker reads the file itself, without its weights beside a parsed copy in Python
        else:
            raw = path.read_bytes()
            model = _parse(raw, label)
        if not file_backed and _uses_external_data(model):
            raw = path  # the checker resolves external data itself
            try:
                onnx.load_external_data_for_model(model, str(path.parent))
            except (OSError, ValueError, onnx.checker.ValidationError) as e:
                raise ModelLoadError(f"{label}: its external weight data could not be read ({e})") from None
    else:
        raise ModelLoadError(f"cannot load a model from a {type(source).__name__}; give a path or bytes")
    _check(model, label, raw)
    if input_shape is not None and len(model.graph.input) == 0:
        raise ModelLoadError(f"{label}: the graph has no inputs to give the shape {input_shape} to")
    log.debug("loaded %s: %d nodes, opset %s", label, len(model.graph.node), default_opset(model))
    return model


def default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 1


def _parse(data: bytes, label: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"{label}: not an ONNX model, or a truncated one (the bytes do not parse: {e})") from None
    return _nonempty(model, label)


def _nonempty(model: onnx.ModelProto, label: str) -> onnx.ModelProto:
    if not model.graph.node and not model.graph.output:
        # Protobuf accepts many random byte strings as a message with no known fields.
        raise ModelLoadError(f"{label}: not an ONNX model (it parses to an empty graph)")
    return model


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _check(model: onnx.ModelProto, label: str, raw=None) -> None:
    opset = default_opset(model)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ModelLoadError(f"{label}: opset {opset} is not supported (ctprune reads opsets {MIN_OPSET} to {MAX_OPSET})")
    try:
        # The bytes we already hold (or the path) spare re-serialising hundreds of MB of weights.
        onnx.checker.check_model(raw if raw is not None else model)
    except (onnx.checker.ValidationError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid model"
        raise ModelLoadError(f"{label}: the ONNX checker rejects the model: {first}") from None
