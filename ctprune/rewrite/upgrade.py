"""The opset and IR version a rewritten model needs: opset >= 13 for the ai.ctprune functions, IR >= 8 for
model-local functions. onnx.version_converter runs on the graph with its large weights detached."""

from __future__ import annotations

import logging

import numpy as np
import onnx

from ctprune.errors import GraphError
from ctprune.ops.names import MIN_OPSET

log = logging.getLogger(__name__)

MIN_IR_VERSION = 8  # model-local functions


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise GraphError("the model imports no default-domain (ai.onnx) opset")


_DETACHED = "ctprune-detached-weight"
_DETACH_MIN_ELEMENTS = 1024  # weights above this size skip the converter's serialization round trip


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


def detached(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """A copy of `model` whose large weights are placeholders (name, type, dims; marked external), and those weights:
    for passes that read the graph but not weight values, without copying hundreds of MB."""
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    _copy_fields(model.graph, light.graph, skip="initializer")
    weights = {}
    for tensor in model.graph.initializer:
        if int(np.prod(tensor.dims)) > _DETACH_MIN_ELEMENTS and tensor.data_location != onnx.TensorProto.EXTERNAL:
            weights[tensor.name] = tensor
            placeholder = light.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
            placeholder.data_location = onnx.TensorProto.EXTERNAL
            placeholder.external_data.add(key="location", value=_DETACHED)
        else:
            light.graph.initializer.append(tensor)
    return light, weights


def _convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """onnx.version_converter run on the graph with its large weights detached: the converter serializes the whole
    model both ways (for VGG-19, 13 of 14 seconds), and its adapters do not read weight values."""
    light, weights = detached(model)
    converted = onnx.version_converter.convert_version(light, opset)
    for tensor in converted.graph.initializer:
        if any(entry.value == _DETACHED for entry in tensor.external_data):
            tensor.CopyFrom(weights[tensor.name])
    return converted


def upgraded(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy at opset >= 13 and IR version >= 8."""
    opset = default_opset(model)
    if opset < MIN_OPSET:
        log.info("upgrading the model from opset %d to %d for the PatternConv function", opset, MIN_OPSET)
        try:
            model = _convert_opset(model, MIN_OPSET)
        except Exception as err:  # the converter raises bare RuntimeErrors naming the op
            raise GraphError(f"could not upgrade the model from opset {opset} to {MIN_OPSET}: {err}") from err
    else:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    if model.ir_version < 4:
        # IR 3 had to list every initializer as a graph input; from IR 4 on such an input means "a default the
        # caller may override", which blocks constant folding. Dropping them keeps the IR-3 meaning.
        initializers = {t.name for t in model.graph.initializer}
        real_inputs = [v for v in model.graph.input if v.name not in initializers]
        del model.graph.input[:]
        model.graph.input.extend(real_inputs)
    model.ir_version = max(model.ir_version, MIN_IR_VERSION)
    return model
