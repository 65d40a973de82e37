"""What the onnxscript references of ctprune's ops share: the ai.ctprune opset they are written in, and their form as a
model-local FunctionProto (re-stamped with the model's default-domain opset, optionally with a residual input Z)."""

from __future__ import annotations

import onnx
from onnxscript.values import Opset

from ctprune.ops.names import DOMAIN, VERSION

ctprune_opset = Opset(DOMAIN, VERSION)


def model_local_function(script_function, op_type: str, min_opset: int, opset: int,
                         residual: bool) -> onnx.FunctionProto:
    """The FunctionProto of `script_function` importing default-domain `opset` (>= min_opset) like its model.

    residual: with a last input Z, added to the input of the function's one Clip (the op's residual comes before its
    activation)."""
    if opset < min_opset:
        raise ValueError(f"the {op_type} function needs default-domain opset >= {min_opset}, got {opset}")
    function = script_function.to_function_proto()
    del function.opset_import[:]
    function.opset_import.append(onnx.helper.make_opsetid("", int(opset)))
    if residual:
        at = [i for i, node in enumerate(function.node) if node.op_type == "Clip"]
        assert len(at) == 1
        clip = function.node[at[0]]
        function.input.append("Z")
        summed = "conv_plus_residual"
        function.node.insert(at[0], onnx.helper.make_node("Add", [clip.input[0], "Z"], [summed]))
        function.node[at[0] + 1].input[0] = summed
    return function
