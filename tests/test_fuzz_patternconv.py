"""Fuzzing PatternConv's kernel: mutations of valid nodes must end in a clean onnxruntime error or in the function's
own answer, never in a crash, a hang or a different answer.

Each mutation starts from a valid random PatternConv node (ctprune.lab.bench_layers' layer builder) and changes one to
three things: an attribute's type, length or values (index ranges, huge and negative numbers, NaN bounds), a missing
or unknown attribute, the storage order, the shapes of X, W, B and Z, the strides and pads, or NaN/+-Inf in the
inputs. The kernel (ctprune's library) runs it; when it returns an output, the model-local function (ops/reference.py,
plain onnxruntime) runs the same node and the two must agree: same shape, same NaN and +-Inf masks, finite values
within 1e-4 relative. (The function runs at onnxruntime's basic optimisation level: at the full level onnxruntime's
NCHWc Conv skips the padded taps, so an Inf weight by the border gives Inf there and NaN in ONNX's Conv;
tests/test_hardening_nan.py.)

The mutations run in child processes, a batch per process: the parent reads "start i" / "done i ..." lines, so a
crash (any signal, or an AddressSanitizer report, which aborts) is pinned to its mutation and the next process goes on
after it; a mutation that reports nothing for FUZZ_TIMEOUT seconds (default 60) is a hang and is killed.

Fresh seeds each run (FUZZ_SEED=<n> replays one; the seed is in every failure). FUZZ_MUTATIONS=<n> (default 500, a few
seconds here; 600 under AddressSanitizer take minutes) sets how many. `make asan` builds the library with AddressSanitizer and runs this test against it
(CTPRUNE_KERNEL_LIBRARY; Python itself is not instrumented, so libasan and libstdc++ are LD_PRELOADed: see the
Makefile).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import select
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

SEED = int(os.environ.get("FUZZ_SEED", secrets.randbits(32)))
MUTATIONS = int(os.environ.get("FUZZ_MUTATIONS", "500"))
TIMEOUT = float(os.environ.get("FUZZ_TIMEOUT", "60"))
HUGE = [-(2**62), -(2**31), -1, 0, 1, 2, 3, 4, 8, 9, 127, 128, 1024, 1025, 2**23, 2**24, 2**31 - 1, 2**31, 2**62]
SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -1.0, 1.0, 1e30, -1e30, 6.0]
KINDS = ["INT", "FLOAT", "INTS", "FLOATS", "STRING", "STRINGS", "TENSOR"]
MAX_ELEMENTS = 1 << 20  # keeps every input small enough that a run is milliseconds


# ---------------------------------------------------------------------------------------------------------------------
# One mutation (runs in the worker process)


def valid_case(rng):
    from ctprune.lab.bench_layers import random_pattern_layer

    O, C = (int(v) for v in rng.integers(1, 9, 2))
    layer = random_pattern_layer(rng, O, C, rng.integers(0, C + 1, O), library_size=int(rng.integers(1, 9)))
    stride = int(rng.integers(1, 3))
    pads = [int(v) for v in rng.integers(0, 3, 4)]
    N = int(rng.integers(1, 3))
    H = int(rng.integers(max(1, 3 - pads[0] - pads[2]), 13))
    W = int(rng.integers(max(1, 3 - pads[1] - pads[3]), 13))
    lo, hi = [(-math.inf, math.inf), (0.0, math.inf), (0.0, 6.0), (-0.5, 0.5)][int(rng.integers(0, 4))]
    attrs = dict(weight_shape=[O, C, 3, 3], patterns=layer.patterns.ravel().tolist(),
                 kernel_filters=layer.kernel_filters.tolist(), kernel_channels=layer.kernel_channels.tolist(),
                 kernel_patterns=layer.kernel_patterns.tolist(), strides=[stride, stride], pads=pads,
                 dilations=[1, 1], group=1, activation_min=lo, activation_max=hi)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32) if rng.random() < 0.7 else None
    oh, ow = (H + pads[0] + pads[2] - 3) // stride + 1, (W + pads[1] + pads[3] - 3) // stride + 1
    z_kind = int(rng.integers(0, 3))
    z = None if z_kind == 0 else rng.standard_normal((1,) if z_kind == 1 else (N, O, oh, ow)).astype(np.float32)
    return dict(attrs=attrs, kinds={}, x=x, w=layer.weights.copy(), b=b, z=z)


def typed_value(value, kind):
    """`value` (a list, int or float) as an attribute value of `kind` (for onnx.helper.make_attribute)."""
    ints = [max(-(2**63), min(2**63 - 1, int(v))) if math.isfinite(v) else 0
            for v in (value if isinstance(value, list) else [value])]
    return {"INT": ints[0] if ints else 0, "FLOAT": float(ints[0]) if ints else 0.0, "INTS": ints,
            "FLOATS": [float(v) for v in ints], "STRING": "1", "STRINGS": [str(v) for v in ints] or ["x"],
            "TENSOR": np.array(ints, np.int64)}[kind]


def mutate_attributes(rng, case, kind):
    """One change to the attributes (`kind`); returns its description."""
    a = case["attrs"]
    names = sorted(a)
    if kind == "retype":
        name = str(rng.choice(names))
        case["kinds"][name] = str(rng.choice(KINDS))
        return f"{name} as {case['kinds'][name]}"
    if kind == "relength":
        name = str(rng.choice([n for n in names if isinstance(a[n], list)]))
        how = int(rng.integers(0, 3))
        a[name] = a[name][:-1] if how == 0 else (a[name] + [int(rng.choice(HUGE[3:9]))] if how == 1 else [])
        return f"{name} length {len(a[name])}"
    if kind == "revalue":
        name = str(rng.choice(names))
        if isinstance(a[name], list):
            if a[name]:
                a[name][int(rng.integers(0, len(a[name])))] = int(rng.choice(HUGE))
        elif isinstance(a[name], float):
            a[name] = float(rng.choice(SPECIAL_FLOATS))
        else:
            a[name] = int(rng.choice(HUGE))
        return f"{name} = {a[name]!r:.80}"
    if kind == "drop":
        name = str(rng.choice(names))
        del a[name]
        return f"no {name}"
    if kind == "extra":
        a["unknown_attribute"] = [1, 2]
        return "unknown attribute"
    if kind == "order":
        k = len(a.get("kernel_filters", []))
        if k < 2:
            return "order (too few kernels)"
        i, j = (int(v) for v in rng.choice(k, 2, replace=False))
        which = str(rng.choice(["kernel_filters", "kernel_channels", "kernel_patterns", "all"]))
        for name in (["kernel_filters", "kernel_channels", "kernel_patterns"] if which == "all" else [which]):
            if name in a and isinstance(a[name], list) and len(a[name]) == k:
                a[name][i], a[name][j] = a[name][j], a[name][i]
        return f"swap kernels {i}, {j} ({which})"
    if kind == "geometry":
        a["strides"] = [int(v) for v in rng.choice([1, 2, 3], 2)]
        a["pads"] = [int(v) for v in rng.integers(0, 4, 4)]
        return f"strides {a['strides']} pads {a['pads']}"
    lo, hi = (float(v) for v in rng.choice(SPECIAL_FLOATS, 2))
    a["activation_min"], a["activation_max"] = lo, hi
    return f"activation ({lo}, {hi})"


def mutate_x(rng, case):
    shape = list(case["x"].shape)
    how = int(rng.integers(0, 4))
    if how == 0 and len(shape) > 1:
        shape[1] = max(0, shape[1] + int(rng.choice([-1, 1])))
    elif how == 1:
        shape = shape[:3] if rng.random() < 0.5 else shape + [2]
    elif how == 2 and len(shape) >= 4:
        shape[2], shape[3] = int(rng.choice([0, 1, 2, 3, 300])), int(rng.choice([0, 1, 2, 3, 40]))
    elif shape:
        shape[0] = int(rng.choice([0, 4]))
    if int(np.prod(shape)) <= MAX_ELEMENTS:
        case["x"] = rng.standard_normal(shape).astype(np.float32)
    return f"X shape {shape}"


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
        o = case["b"].size if case["b"] is not None else 4
        shape = [[o + 1], [max(0, o - 1)], [1, o], []][int(rng.integers(0, 4))]
        case["b"] = rng.standard_normal(shape).astype(np.float32)
        return f"B shape {shape}"
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
    import onnx
    from onnx import AttributeProto, TensorProto, helper, numpy_helper

    from ctprune.ops.reference import pattern_conv_function

    inputs = ["X", "W", "B" if case["b"] is not None else ""] + (["Z"] if case["z"] is not None else [])
    while inputs and inputs[-1] == "":
        inputs.pop()
    node = helper.make_node("PatternConv", inputs, ["Y"], domain="ai.ctprune", name="fuzzed")
    for name, value in case["attrs"].items():
        kind = case["kinds"].get(name)
        if kind is not None:
            value = typed_value(value, kind)
            if kind == "TENSOR":
                value = numpy_helper.from_array(value)
            attr_type = getattr(AttributeProto, kind)
        else:
            attr_type = AttributeProto.INTS if isinstance(value, list) else None
        node.attribute.append(helper.make_attribute(name, value, attr_type=attr_type))
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
    import onnxruntime as ort

    rng = np.random.default_rng([seed, index])
    case = valid_case(rng)
    what = [mutate(rng, case) for _ in range(int(rng.integers(1, 4)))]
    feeds = {"X": case["x"]} if case["z"] is None else {"X": case["x"], "Z": case["z"]}
    ort_error = (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidArgument,
                 ort.capi.onnxruntime_pybind11_state.InvalidGraph,
                 ort.capi.onnxruntime_pybind11_state.RuntimeException,
                 ort.capi.onnxruntime_pybind11_state.NotImplemented,
                 ort.capi.onnxruntime_pybind11_state.InvalidProtobuf)
    result = dict(index=index, mutations=what)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.register_custom_ops_library(library)
    try:
        got = ort.InferenceSession(build(case, False), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    except ort_error as err:
        message = str(err)
        return dict(result, status="error", clean="PatternConv" in message or "ai.ctprune" in message or "[ShapeInferenceError]"
                    in message or "INVALID" in message or "Type Error" in message, message=message[:300])
    plain = ort.SessionOptions()
    plain.intra_op_num_threads = 1
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # see the module docstring
    try:
        want = ort.InferenceSession(build(case, True), plain, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    except ort_error as err:
        return dict(result, status="function-refused", message=str(err)[:300], api_gap=api_gap(case))
    return dict(result, status="compared", problem=compare(got, want))


def api_gap(case) -> bool:
    """The one kind of node the kernel cannot refuse: onnxruntime's C API reads STRINGS, and FLOATS with no element,
    as an empty INTS list (tests/test_hardening_attributes.py), which is valid for the kernel lists of a layer with no
    kernel left (and then for `patterns`)."""
    return any(kind == "STRINGS" or (kind == "FLOATS" and not case["attrs"][name])
               for name, kind in case["kinds"].items()
               if name in ("kernel_filters", "kernel_channels", "kernel_patterns", "patterns"))


def compare(got, want):
    """None when the kernel's output is the function's; else what differs."""
    if got.shape != want.shape:
        return f"shape {got.shape} vs {want.shape}"
    for name, mask in (("NaN", np.isnan), ("+Inf", np.isposinf), ("-Inf", np.isneginf)):
        differ = int((mask(got) != mask(want)).sum())
        if differ:
            return f"{name} masks differ at {differ} of {got.size} outputs"
    finite = np.isfinite(want)
    scale = max(float(np.abs(want[finite]).max(initial=0.0)), 1.0)
    error = float(np.abs(got[finite] - want[finite]).max(initial=0.0)) / scale
    return None if error <= 1e-4 else f"relative error {error:.2e}"


def worker(seed, start, count, library):
    import onnxruntime as ort

    ort.set_default_logger_severity(4)  # the refused sessions' log lines would only be noise here
    import traceback

    for index in range(start, start + count):
        print(f"start {index}", flush=True)
        try:
            result = run_one(seed, index, library)
        except Exception:  # a bug of this harness, not of the kernel: reported apart from crashes
            result = dict(index=index, status="harness-error", message=traceback.format_exc()[-2000:])
        print("done " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# The parent: batches of mutations in child processes, crashes and hangs pinned to their mutation


def fuzz(seed, total, library, timeout=TIMEOUT):
    results, crashes, hangs = [], [], []
    index = 0
    while index < total:
        with tempfile.TemporaryFile() as stderr:
            child = subprocess.Popen([sys.executable, __file__, "--worker", str(seed), str(index), str(total - index),
                                      library], stdout=subprocess.PIPE, stderr=stderr)
            fd = child.stdout.fileno()
            current, pending, last = None, b"", time.monotonic()
            while True:
                ready, _, _ = select.select([fd], [], [], 1.0)
                if not ready:
                    if time.monotonic() - last > timeout:
                        child.kill()
                        child.wait()
                        hangs.append(current if current is not None else index)
                        index = hangs[-1] + 1
                        break
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:  # the child ended
                    code = child.wait()
                    if current is not None or index < total:
                        stderr.seek(0)
                        crashes.append(dict(index=current if current is not None else index, returncode=code,
                                            stderr=stderr.read().decode(errors="replace")[-3000:]))
                        index = crashes[-1]["index"] + 1
                    break
                last = time.monotonic()
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in (raw.decode() for raw in lines):
                    if line.startswith("start "):
                        current = int(line.split()[1])
                    elif line.startswith("done "):
                        results.append(json.loads(line[5:]))
                        index, current = results[-1]["index"] + 1, None
            child.stdout.close()
    return results, crashes, hangs


def test_fuzzed_nodes_never_crash_hang_or_disagree():
    from ctprune.runtime import kernel_library_path

    try:
        library = kernel_library_path()
    except Exception as err:
        pytest.skip(f"kernel library not built: {err}")
    results, crashes, hangs = fuzz(SEED, MUTATIONS, library)
    counts = {s: sum(r["status"] == s for r in results) for s in ("error", "compared", "function-refused")}
    counts["of them the C API's blind spot"] = sum(r.get("api_gap", False) for r in results)
    print(f"fuzz seed {SEED}: {MUTATIONS} mutations, {counts}, crashes {len(crashes)}, hangs {len(hangs)}, "
          f"library {library}")
    where = f"FUZZ_SEED={SEED}"
    assert not crashes, f"{where}: crashes at mutations {[c['index'] for c in crashes]}: {crashes[0]}"
    assert not hangs, f"{where}: hangs at mutations {hangs}"
    assert len(results) == MUTATIONS, where
    broken = [r for r in results if r["status"] == "harness-error"]
    assert not broken, f"{where}: the harness itself failed, e.g. {broken[0]}"
    wrong = [r for r in results if r["status"] == "compared" and r["problem"]]
    assert not wrong, f"{where}: {len(wrong)} outputs differ from the function's, e.g. {wrong[0]}"
    unclear = [r for r in results if r["status"] == "error" and not r["clean"]]
    assert not unclear, f"{where}: errors that name neither the node nor the problem, e.g. {unclear[0]}"
    laxer = [r for r in results if r["status"] == "function-refused" and not r["api_gap"]]
    assert not laxer, f"{where}: the kernel ran what the function refuses, e.g. {laxer[0]}"


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--worker":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
