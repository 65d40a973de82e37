"""Models whose large weights stay in their files until a tensor is read, one at a time.

Parsing a 575 MB ONNX file with protobuf holds the file's bytes and the parsed copy at once, and reading a tensor's
`raw_data` copies it a third time; a model with external data loaded the usual way holds all of it in the proto.
`load_file_backed` walks the file's protobuf wire format instead (ModelProto.graph -> GraphProto.initializer ->
TensorProto.raw_data, fields 7, 5 and 9) and parses a model without the large float payloads: each such
initializer keeps its name, type and dims and becomes a reference (EXTERNAL data as ONNX defines it: location
relative to the model's folder, offset, length; plus a marker entry holding that folder) to the bytes where they
already are, in the model file itself or its external-data file. `file_backed_array` reads one such tensor straight into a fresh array; `materialized` puts the values back.
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import numpy as np
import onnx

from ctprune.errors import ModelLoadError

__all__ = ["load_file_backed", "is_file_backed", "file_backed_array", "materialized", "external_data_view", "MIN_BYTES"]

MIN_BYTES = 64 << 10  # payloads below this stay inline: the shape-like constants passes read are tiny
MARK = "ctprune-file-backed"
# Types stored little-endian as raw bytes with a numpy dtype: what np.fromfile can read back as is.
_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.FLOAT16: np.float16}
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_DATA_TYPE, _TENSOR_RAW_DATA = 7, 5, 2, 9
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14


def load_file_backed(path: str | os.PathLike) -> onnx.ModelProto:
    """The model at `path` with every large float initializer as a reference into the file holding its bytes."""
    path = Path(path).resolve()
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            light = _without_payloads(buf, path.name)
    except ValueError as e:  # an empty file cannot be mapped; a malformed one fails the wire walk
        raise ModelLoadError(f"{path}: not an ONNX model, or a truncated one ({e})") from None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(light)
    except Exception as e:
        raise ModelLoadError(f"{path}: not an ONNX model, or a truncated one (the bytes do not parse: {e})") from None
    _reference_external_files(model, path.parent)
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor.external_data.add(key=MARK, value=str(path.parent))
    return model


def is_file_backed(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(e.key == MARK for e in tensor.external_data)


def file_backed_array(tensor: onnx.TensorProto) -> np.ndarray:
    """A file-backed tensor's values, read from its file into a new writable array."""
    entries = {e.key: e.value for e in tensor.external_data}
    dtype = np.dtype(_DTYPES[tensor.data_type]).newbyteorder("<")
    count = math.prod(tensor.dims)
    offset, length = int(entries["offset"]), int(entries["length"])
    if length != count * dtype.itemsize:
        raise ModelLoadError(f"tensor {tensor.name!r}: {length} bytes stored for {count} values of {dtype}")
    array = np.fromfile(os.path.join(entries[MARK], entries["location"]), dtype=dtype, count=count, offset=offset)
    if array.size != count:
        raise ModelLoadError(f"tensor {tensor.name!r}: its file {entries['location']!r} ends before its data does")
    return array.astype(dtype.newbyteorder("="), copy=False).reshape(tuple(tensor.dims))


def external_data_view(model: onnx.ModelProto) -> str | None:
    """Turn a file-backed model into plain ONNX external data (in place: the marker entries go) and return the
    folder its locations are relative to; None when nothing in it is file-backed (the model is left as it is)."""
    folder = None
    for tensor in model.graph.initializer:
        if is_file_backed(tensor):
            entries = [(e.key, e.value) for e in tensor.external_data]
            folder = dict(entries)[MARK]
            del tensor.external_data[:]
            for key, value in entries:
                if key != MARK:
                    tensor.external_data.add(key=key, value=value)
    return folder


def materialized(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every file-backed initializer holding its values inline again (in place)."""
    for tensor in model.graph.initializer:
        if is_file_backed(tensor):
            values = file_backed_array(tensor)
            name = tensor.name
            tensor.CopyFrom(onnx.numpy_helper.from_array(values, name))
    return model


# ---- the wire walk ------------------------------------------------------------------------------------------------
def _varint(buf, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("a varint runs past the end of the data")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(buf, start: int, end: int):
    """(field number, wire type, field start, payload start, payload end) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, payload_end = _varint(buf, pos)
        elif wire == 1:
            payload_end = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            payload_end = pos + length
        elif wire == 5:
            payload_end = pos + 4
        else:
            raise ValueError(f"wire type {wire} (field {number}) is not used by ONNX")
        if payload_end > end:
            raise ValueError(f"field {number} runs past the end of its message")
        yield number, wire, field_start, pos, payload_end
        pos = payload_end


def _message(number: int, payload: bytes) -> bytes:
    return _varint_bytes(number << 3 | 2) + _varint_bytes(len(payload)) + payload


def _without_payloads(buf, location: str) -> bytes:
    out = bytearray()
    for number, wire, field_start, start, end in _fields(buf, 0, len(buf)):
        if number == _MODEL_GRAPH and wire == 2:
            out += _message(number, _graph_without_payloads(buf, start, end, location))
        else:
            out += buf[field_start:end]
    return bytes(out)


def _graph_without_payloads(buf, start: int, end: int, location: str) -> bytes:
    out = bytearray()
    for number, wire, field_start, s, e in _fields(buf, start, end):
        tensor = _tensor_without_payload(buf, s, e, location) if number == _GRAPH_INITIALIZER and wire == 2 else None
        out += _message(number, tensor) if tensor is not None else buf[field_start:e]
    return bytes(out)


def _tensor_without_payload(buf, start: int, end: int, location: str) -> bytes | None:
    """The TensorProto in buf[start:end] with its raw_data as a file reference, or None to keep it as it is."""
    data_type, raw = None, None
    for number, wire, _, s, e in _fields(buf, start, end):
        if number == _TENSOR_DATA_TYPE and wire == 0:
            data_type = _varint(buf, s)[0]
        elif number == _TENSOR_RAW_DATA and wire == 2:
            raw = (s, e)
    if raw is None or data_type not in _DTYPES or raw[1] - raw[0] < MIN_BYTES:
        return None
    out = bytearray()
    for number, wire, field_start, s, e in _fields(buf, start, end):
        if number not in (_TENSOR_RAW_DATA, _TENSOR_DATA_LOCATION, _TENSOR_EXTERNAL_DATA):
            out += buf[field_start:e]
    out += _varint_bytes(_TENSOR_DATA_LOCATION << 3) + _varint_bytes(onnx.TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(raw[0])), ("length", str(raw[1] - raw[0]))):
        entry = _message(1, key.encode()) + _message(2, value.encode())
        out += _message(_TENSOR_EXTERNAL_DATA, entry)
    return bytes(out)


def _reference_external_files(model: onnx.ModelProto, folder: Path) -> None:
    """External-data initializers (the ONNX kind) get an explicit offset and length; types np.fromfile cannot read
    back are loaded inline. A location outside the model's folder is refused, as onnx does."""
    from onnx.external_data_helper import load_external_data_for_tensor

    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        where = (folder / entries.get("location", "")).resolve()
        if not entries.get("location") or folder.resolve() not in where.parents:
            raise ModelLoadError(f"{folder}: initializer {tensor.name!r} names external data outside the model's "
                                 f"folder ({entries.get('location')!r})")
        if not where.is_file():
            raise ModelLoadError(f"{folder}: the external data file {entries['location']!r} of initializer "
                                 f"{tensor.name!r} is missing")
        if tensor.data_type not in _DTYPES:
            try:
                load_external_data_for_tensor(tensor, str(folder))
            except (OSError, ValueError) as e:
                raise ModelLoadError(f"{folder}: the external data of {tensor.name!r} could not be read ({e})") from None
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
            continue
        offset = int(entries.get("offset", 0))
        length = int(entries["length"]) if "length" in entries else where.stat().st_size - offset
        if offset + length > where.stat().st_size:
            raise ModelLoadError(f"{folder}: the external data of {tensor.name!r} runs past the end of "
                                 f"{entries['location']!r}")
        del tensor.external_data[:]
        for key, value in (("location", entries["location"]), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=key, value=value)
