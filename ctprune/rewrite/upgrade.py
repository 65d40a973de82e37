"""The opset and IR version a rewritten model needs: opset >= 13 for the ai.ctprune functions, IR >= 8 for
model-local functions. onnx.version_converter runs on the graph with its large weights detached
(graph/weightless.py)."""

from __future__ import annotations

import logging

import onnx

from ctprune.errors import GraphError
from ctprune.graph.load import default_opset
from ctprune.graph.weightless import detached, reattached
from ctprune.ops.names import MIN_OPSET

log = logging.getLogger(__name__)

MIN_IR_VERSION = 8  # model-local functions


def _convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """onnx.version_converter run on the graph with its large weights detached: the converter serializes the whole
    model both ways (for VGG-19, 13 of 14 seconds), and its adapters do not read weight values."""
    light, weights = detached(model)
    return reattached(onnx.version_converter.convert_version(light, opset), weights)


def upgraded(model: onnx.ModelProto, in_place: bool = False) -> onnx.ModelProto:
    """A copy at opset >= 13 and IR version >= 8; `in_place`: `model` itself where no opset conversion is needed."""
    opset = default_opset(model)
    if opset < MIN_OPSET:
        log.info("upgrading the model from opset %d to %d for the PatternConv function", opset, MIN_OPSET)
        try:
            model = _convert_opset(model, MIN_OPSET)
        except Exception as err:  # the converter raises bare RuntimeErrors naming the op
            raise GraphError(f"could not upgrade the model from opset {opset} to {MIN_OPSET}: {err}") from err
    elif not in_place:
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
