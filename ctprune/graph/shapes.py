"""Tensor shapes: onnx shape inference on a weightless copy, and the one table `name -> dims` every layer reads."""

from __future__ import annotations

import logging

import onnx

from ctprune.graph.weightless import detached

__all__ = ["infer_shapes", "shape_table", "inferred_shape_table"]

log = logging.getLogger(__name__)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with inferred value_info and output types (in place, returned).

    Inference runs on a detached copy (graph/weightless.py): serialising hundreds of MB of weights to the C++
    inference and back would dominate the time otherwise. Where inference fails the model is returned as it was.
    """
    light, _ = detached(model)
    if light.ir_version < 4:
        light.ir_version = 4  # so the initializers need not be repeated as inputs
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception as e:  # inference is a help, not a requirement: every user runs without it
        log.warning("shape inference failed (%s); continuing without inferred shapes", str(e).splitlines()[0])
        return model
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    outputs = {o.name: o for o in inferred.graph.output}
    for o in model.graph.output:
        if o.name in outputs:
            o.CopyFrom(outputs[o.name])
    return model


def shape_table(model: onnx.ModelProto, symbolic: bool = False) -> dict[str, tuple]:
    """Tensor name -> dims from the model's declared and inferred types (inputs, value_info, outputs) and its
    initializers. A dim is an int, or None where unknown; with `symbolic`, a named dim (dim_param) is its name, so
    two tensors sharing a symbolic batch compare equal."""
    shapes = {}
    graph = model.graph
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) if symbolic
                                    else None for d in t.shape.dim)
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def inferred_shape_table(model: onnx.ModelProto, symbolic: bool = False) -> dict[str, tuple]:
    """`shape_table` of `model` after shape inference, without touching `model`."""
    light, _ = detached(model)
    return shape_table(infer_shapes(light), symbolic)
