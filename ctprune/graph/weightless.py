"""Weightless copies of a model for onnx's C++ passes (shape inference, the version converter).

Those passes serialise the whole model to C++ and back, and for a model with hundreds of MB of weights that round trip
is most of their time (VGG-19's opset upgrade: 13 of 14 s), yet they read weights only for their type and dims. A
detached copy holds every large float weight as a placeholder (name, type, dims, marked external) and hands the
weights back beside it; `reattached` puts them back after the pass. Small and non-float tensors stay inline: shape
inference's data propagation and the converter's adapters read values of shape-like constants (Reshape shapes,
Resize scales), which are small.
"""

from __future__ import annotations

import numpy as np
import onnx

__all__ = ["detached", "reattached", "stored_tensor", "stored_array", "is_placeholder", "DETACH_MIN_ELEMENTS",
           "FLOAT_TYPES"]

DETACH_MIN_ELEMENTS = 1024  # float tensors above this size skip the serialisation round trip
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
_PLACEHOLDER = "ctprune-detached-weight"


def _copy_fields(source, target, skip: str) -> None:
    """Copy every set field of a protobuf message but one (target.CopyFrom(source) without the big part)."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def detached(model: onnx.ModelProto, names=None) -> tuple[onnx.ModelProto, dict]:
    """(a copy of `model` whose large float weights are placeholders, {name: the weight}); `model` is untouched.
    `names`: exactly the initializers of these names become placeholders instead (whatever their size and type,
    file-backed ones too; other external data stays as it is)."""
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    _copy_fields(model.graph, light.graph, skip="initializer")
    weights = {}
    for tensor in model.graph.initializer:
        if names is not None:
            detach = tensor.name in names
        else:
            detach = int(np.prod(tensor.dims)) > DETACH_MIN_ELEMENTS and tensor.data_type in FLOAT_TYPES
        if detach and (tensor.data_location != onnx.TensorProto.EXTERNAL or (names is not None and _file_backed(tensor))):
            weights[tensor.name] = tensor
            placeholder = light.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
            placeholder.data_location = onnx.TensorProto.EXTERNAL
            placeholder.external_data.add(key="location", value=_PLACEHOLDER)
        else:
            light.graph.initializer.append(tensor)
    return light, weights


def _file_backed(tensor: onnx.TensorProto) -> bool:
    from ctprune.graph.filebacked import is_file_backed

    return is_file_backed(tensor)


def reattached(model: onnx.ModelProto, weights: dict) -> onnx.ModelProto:
    """`model` (a pass's result on a detached copy) with its placeholders replaced by `weights`, in place; a
    placeholder `weights` does not hold stays one."""
    for tensor in model.graph.initializer:
        if tensor.name in weights and any(entry.value == _PLACEHOLDER for entry in tensor.external_data):
            tensor.CopyFrom(weights[tensor.name])
    return model


def stored_tensor(tensor: onnx.TensorProto, weights: dict | None) -> onnx.TensorProto:
    """The tensor holding `tensor`'s values: itself, or for a placeholder `detached` left, its entry in `weights`."""
    if weights and tensor.name in weights and is_placeholder(tensor):
        return weights[tensor.name]
    return tensor


def is_placeholder(tensor: onnx.TensorProto) -> bool:
    return any(entry.value == _PLACEHOLDER for entry in tensor.external_data)


def stored_array(tensor: onnx.TensorProto, weights: dict | None = None) -> np.ndarray:
    """`tensor`'s values: a placeholder's from `weights` (a TensorProto, or the array itself), a file-backed
    tensor's from its file (filebacked.py)."""
    from ctprune.graph.filebacked import file_backed_array, is_file_backed

    stored = stored_tensor(tensor, weights)
    if isinstance(stored, np.ndarray):
        return stored
    return file_backed_array(stored) if is_file_backed(stored) else onnx.numpy_helper.to_array(stored)
