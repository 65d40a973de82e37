"""Fuzzing PatternConv's kernel: mutations of valid nodes must end in a clean onnxruntime error or in the function's
own answer, never in a crash, a hang or a different answer.

Each mutation starts from a valid random PatternConv node (ctprune.lab.bench_layers' layer builder) and changes one to
three things: an attribute's type, length or values (index ranges, huge and negative numbers, NaN bounds), a missing
or unknown attribute, the storage order, the shapes of X, W, B and Z, the strides and pads, or NaN/+-Inf in the
inputs. The kernel (ctprune's library) runs it; when it returns an output, the model-local function (ops/reference.py,
plain onnxruntime) runs the same node and the two must agree. The runner, the comparison, the crash and hang
accounting and the seeds (FUZZ_SEED, FUZZ_MUTATIONS, default 500, a few seconds here; FUZZ_TIMEOUT) are
tests/fuzz_harness.py's; `make asan` runs this test against the library built with AddressSanitizer.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the worker runs this file as a script
from fuzz_harness import (ATTRIBUTE_MUTATIONS, SPECIAL_FLOATS, add_attributes, check_fuzz,  # noqa: E402
                          mutate_attribute, mutate_b, mutate_x, run_kernel_and_function, worker_main)


# ---------------------------------------------------------------------------------------------------------------------
# One mutation (runs in the worker process)


def valid_case(rng):
    from ctprune.lab.bench_layers import random_pattern_layer
    from ctprune.ops import pattern_layout

    O, C = (int(v) for v in rng.integers(1, 9, 2))
    layer = random_pattern_layer(rng, O, C, rng.integers(0, C + 1, O), library_size=int(rng.integers(1, 9)))
    stride = int(rng.integers(1, 3))
    pads = [int(v) for v in rng.integers(0, 3, 4)]
    N = int(rng.integers(1, 3))
    H = int(rng.integers(max(1, 3 - pads[0] - pads[2]), 13))
    W = int(rng.integers(max(1, 3 - pads[1] - pads[3]), 13))
    lo, hi = [(-math.inf, math.inf), (0.0, math.inf), (0.0, 6.0), (-0.5, 0.5)][int(rng.integers(0, 4))]
    index = pattern_layout.encode(layer.kernel_filters, layer.kernel_channels, layer.kernel_patterns,
                                  len(layer.patterns))
    attrs = dict(weight_shape=[O, C, 3, 3], patterns=layer.patterns.ravel().tolist(), **index,
                 strides=[stride, stride], pads=pads, dilations=[1, 1], group=1, activation_min=lo,
                 activation_max=hi)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32) if rng.random() < 0.7 else None
    oh, ow = (H + pads[0] + pads[2] - 3) // stride + 1, (W + pads[1] + pads[3] - 3) // stride + 1
    z_kind = int(rng.integers(0, 3))
    z = None if z_kind == 0 else rng.standard_normal((1,) if z_kind == 1 else (N, O, oh, ow)).astype(np.float32)
    return dict(attrs=attrs, kinds={}, x=x, w=layer.weights.copy(), b=b, z=z)


def mutate_attributes(rng, case, kind):
    """One change to the attributes (`kind`); returns its description."""
    if kind in ATTRIBUTE_MUTATIONS:
        return mutate_attribute(rng, case, kind)
    a = case["attrs"]
    if kind == "order":  # two kernels' codes, or two filters' runs, swapped
        which = str(rng.choice(["kernel_codes", "filter_runs"]))
        values = a.get(which)
        if not isinstance(values, list) or len(values) < (4 if which == "filter_runs" else 2):
            return f"order (too few {which})"
        if which == "kernel_codes":
            i, j = (int(v) for v in rng.choice(len(values), 2, replace=False))
            values[i], values[j] = values[j], values[i]
        else:
            i, j = (2 * int(v) for v in rng.choice(len(values) // 2, 2, replace=False))
            values[i:i + 2], values[j:j + 2] = values[j:j + 2], values[i:i + 2]
        return f"swap {which} entries {i}, {j}"
    if kind == "geometry":
        a["strides"] = [int(v) for v in rng.choice([1, 2, 3], 2)]
        a["pads"] = [int(v) for v in rng.integers(0, 4, 4)]
        return f"strides {a['strides']} pads {a['pads']}"
    lo, hi = (float(v) for v in rng.choice(SPECIAL_FLOATS, 2))
    a["activation_min"], a["activation_max"] = lo, hi
    return f"activation ({lo}, {hi})"


def mutate_tensors(rng, case, kind):
    """One change to the inputs (`kind`: x, w, b, z shapes, or NaN/Inf values); returns its description."""
    if kind == "x":
        return mutate_x(rng, case)
    if kind == "w":
        k = case["w"].shape[0]
        shape = [[k + 1, 4], [max(0, k - 1), 4], [k, 3], [k * 4], [k, 4, 1]][int(rng.integers(0, 5))]
        case["w"] = rng.standard_normal(shape).astype(np.float32)
        return f"W shape {shape}"
    if kind == "b":
        return mutate_b(rng, case)
    if kind == "z":
        shape = [[1], [2], [1, 1, 1, 1], list(case["x"].shape), []][int(rng.integers(0, 5))]
        case["z"] = rng.standard_normal(shape).astype(np.float32)
        return f"Z shape {shape}"
    which = str(rng.choice(["x", "w", "b", "z"]))
    t = case[which]
    if t is not None and t.size:
        t.reshape(-1)[int(rng.integers(0, t.size))] = rng.choice([np.nan, np.inf, -np.inf])
    return f"non-finite in {which}"


def mutate(rng, case):
    """Applies one random mutation to `case` in place; returns its description."""
    kind = str(rng.choice(["retype", "relength", "revalue", "drop", "extra", "order", "x", "w", "b", "z", "nonfinite",
                           "geometry", "activation"]))
    if kind in ("x", "w", "b", "z", "nonfinite"):
        return mutate_tensors(rng, case, kind)
    return mutate_attributes(rng, case, kind)


def build(case, with_function: bool):
    from onnx import TensorProto, helper, numpy_helper

    from ctprune.ops.reference import pattern_conv_function

    inputs = ["X", "W", "B" if case["b"] is not None else ""] + (["Z"] if case["z"] is not None else [])
    while inputs and inputs[-1] == "":
        inputs.pop()
    node = helper.make_node("PatternConv", inputs, ["Y"], domain="ai.ctprune", name="fuzzed")
    add_attributes(node, case)
    inits = [numpy_helper.from_array(case["w"], "W")]
    if case["b"] is not None:
        inits.append(numpy_helper.from_array(case["b"], "B"))
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)]
    if case["z"] is not None:
        graph_inputs.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, None))
    graph = helper.make_graph([node], "fuzz", graph_inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              inits)
    functions = [pattern_conv_function(17, residual=case["z"] is not None)] if with_function else []
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.ctprune", 1)],
                              functions=functions)
    model.ir_version = 8
    return model.SerializeToString()


def run_one(seed, index, library):
    rng = np.random.default_rng([seed, index])
    case = valid_case(rng)
    what = [mutate(rng, case) for _ in range(int(rng.integers(1, 4)))]
    feeds = {"X": case["x"]} if case["z"] is None else {"X": case["x"], "Z": case["z"]}
    return dict(run_kernel_and_function("PatternConv", build(case, False), build(case, True), feeds, library,
                                        api_gap=lambda: api_gap(case)), mutations=what)


def api_gap(case) -> bool:
    """The one kind of node the kernel cannot refuse: onnxruntime's C API reads STRINGS, and FLOATS with no element,
    as an empty INTS list (tests/test_hardening_attributes.py), which is valid for the kernel index of a layer with no
    kernel left (and then for `patterns`)."""
    return any(kind == "STRINGS" or (kind == "FLOATS" and not case["attrs"][name])
               for name, kind in case["kinds"].items()
               if name in ("filter_runs", "kernel_codes", "patterns"))


def test_fuzzed_nodes_never_crash_hang_or_disagree():
    check_fuzz(os.path.abspath(__file__))


if __name__ == "__main__":
    worker_main(run_one)
