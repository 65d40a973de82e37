"""What the fuzz tests of ctprune's custom ops share (tests/test_fuzz_patternconv.py, tests/test_fuzz_sparseconv.py).

A fuzz test draws valid random nodes of its op, mutates each one to three times, and runs every mutation twice: through
ctprune's kernel (its library registered) and through the model-local function (plain onnxruntime). Every run must end
in a clean onnxruntime error or in the function's own answer: same shape, same NaN and +-Inf masks, finite values within
1e-4 relative. (The function runs at onnxruntime's basic optimisation level: at the full level onnxruntime's NCHWc Conv
skips the padded taps, so an Inf weight by the border gives Inf there and NaN in ONNX's Conv;
tests/test_hardening_nan.py.)

The mutations run in child processes, a batch per process (the test module run as a script with --worker): the parent
reads "start i" / "done i ..." lines, so a crash (any signal, or an AddressSanitizer report, which aborts) is pinned to
its mutation and the next process goes on after it; a mutation that reports nothing for FUZZ_TIMEOUT seconds (default
60) is a hang and is killed.

Fresh seeds each run (FUZZ_SEED=<n> replays one; the seed is in every failure). FUZZ_MUTATIONS=<n> (default 500) sets
how many. `make asan` runs the fuzz tests against the library built with AddressSanitizer (CTPRUNE_KERNEL_LIBRARY).
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
import traceback

import numpy as np
import pytest

SEED = int(os.environ.get("FUZZ_SEED", secrets.randbits(32)))
MUTATIONS = int(os.environ.get("FUZZ_MUTATIONS", "500"))
TIMEOUT = float(os.environ.get("FUZZ_TIMEOUT", "60"))
HUGE = [-(2**62), -(2**31), -1, 0, 1, 2, 3, 4, 8, 9, 127, 128, 1024, 1025, 2**23, 2**24, 2**31 - 1, 2**31, 2**62]
SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -1.0, 1.0, 1e30, -1e30, 6.0]
KINDS = ["INT", "FLOAT", "INTS", "FLOATS", "STRING", "STRINGS", "TENSOR"]
MAX_ELEMENTS = 1 << 20  # keeps every input small enough that a run is milliseconds
ATTRIBUTE_MUTATIONS = ("retype", "relength", "revalue", "drop", "extra")


# ---------------------------------------------------------------------------------------------------------------------
# Attributes: a case holds them as case["attrs"] (name -> int, float or list of ints) and case["kinds"] (name -> the
# ONNX attribute type to write instead of the natural one)


def typed_value(value, kind):
    """`value` (a list, int or float) as an attribute value of `kind` (for onnx.helper.make_attribute)."""
    ints = [max(-(2**63), min(2**63 - 1, int(v))) if math.isfinite(v) else 0
            for v in (value if isinstance(value, list) else [value])]
    return {"INT": ints[0] if ints else 0, "FLOAT": float(ints[0]) if ints else 0.0, "INTS": ints,
            "FLOATS": [float(v) for v in ints], "STRING": "1", "STRINGS": [str(v) for v in ints] or ["x"],
            "TENSOR": np.array(ints, np.int64)}[kind]


def mutate_attribute(rng, case, kind):
    """One change of `kind` (ATTRIBUTE_MUTATIONS) to the attributes; returns its description."""
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
    assert kind == "extra", kind
    a["unknown_attribute"] = [1, 2]
    return "unknown attribute"


def mutate_b(rng, case):
    """B of another length or rank; returns its description."""
    o = case["b"].size if case["b"] is not None else 4
    shape = [[o + 1], [max(0, o - 1)], [1, o], []][int(rng.integers(0, 4))]
    case["b"] = rng.standard_normal(shape).astype(np.float32)
    return f"B shape {shape}"


def mutate_x(rng, case):
    """One change to X's shape (channels, rank, spatial size or batch); returns its description."""
    shape = list(case["x"].shape)
    how = int(rng.integers(0, 4))
    if how == 0 and len(shape) > 1:
        shape[1] = max(0, shape[1] + int(rng.choice([-1, 1])))
    elif how == 1:
        shape = shape[:-1] if rng.random() < 0.5 else shape + [2]
    elif how == 2 and len(shape) >= 4:
        shape[2], shape[3] = int(rng.choice([0, 1, 2, 3, 300])), int(rng.choice([0, 1, 2, 3, 40]))
    elif shape:
        shape[0] = int(rng.choice([0, 4]))
    if int(np.prod(shape)) <= MAX_ELEMENTS:
        case["x"] = rng.standard_normal(shape).astype(np.float32)
    return f"X shape {shape}"


def add_attributes(node, case):
    """Writes case["attrs"] into `node`, each with its type from case["kinds"] or else its natural one (a list INTS,
    even when empty)."""
    from onnx import AttributeProto, helper, numpy_helper

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


# ---------------------------------------------------------------------------------------------------------------------
# One mutation's two runs (in the worker process)


def run_kernel_and_function(op_type, kernel_model, function_model, feeds, library, api_gap=lambda: False):
    """Runs the serialized `kernel_model` with ctprune's `library` and, when that returns, `function_model` (the same
    node with the model-local function) with plain onnxruntime. Returns the result fields: status "error" (the kernel
    refused; `clean` says whether the message names the node or the problem), "function-refused" (the kernel ran what
    the function refuses; `api_gap` says whether that is a kind of node the kernel cannot see, see api_gap's caller)
    or "compared" (`problem`: None, or how the outputs differ)."""
    import onnxruntime as ort

    state = ort.capi.onnxruntime_pybind11_state
    ort_error = (state.Fail, state.InvalidArgument, state.InvalidGraph, state.RuntimeException, state.NotImplemented,
                 state.InvalidProtobuf)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.register_custom_ops_library(library)
    try:
        got = ort.InferenceSession(kernel_model, so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    except ort_error as err:
        message = str(err)
        return dict(status="error", clean=op_type in message or "ai.ctprune" in message or "[ShapeInferenceError]"
                    in message or "INVALID" in message or "Type Error" in message, message=message[:300])
    plain = ort.SessionOptions()
    plain.intra_op_num_threads = 1
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # see the module docstring
    try:
        want = ort.InferenceSession(function_model, plain, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    except ort_error as err:
        return dict(status="function-refused", message=str(err)[:300], api_gap=api_gap())
    return dict(status="compared", problem=compare(got, want))


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


def worker(run_one, seed, start, count, library):
    """Runs mutations start.. start+count-1, printing "start i" before and "done <result json>" after each."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)  # the refused sessions' log lines would only be noise here
    for index in range(start, start + count):
        print(f"start {index}", flush=True)
        try:
            result = dict(run_one(seed, index, library), index=index)
        except Exception:  # a bug of the harness, not of the kernel: reported apart from crashes
            result = dict(index=index, status="harness-error", message=traceback.format_exc()[-2000:])
        print("done " + json.dumps(result), flush=True)


def worker_main(run_one):
    """The worker's entry point: a fuzz test module calls this under `if __name__ == "__main__"`."""
    if len(sys.argv) == 6 and sys.argv[1] == "--worker":
        worker(run_one, int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])


# ---------------------------------------------------------------------------------------------------------------------
# The parent: batches of mutations in child processes, crashes and hangs pinned to their mutation


def fuzz(script, seed, total, library, timeout=TIMEOUT):
    """Runs mutations 0..total-1 of `script`'s worker; returns (results, crashes, hangs)."""
    results, crashes, hangs = [], [], []
    index = 0
    while index < total:
        with tempfile.TemporaryFile() as stderr:
            child = subprocess.Popen([sys.executable, script, "--worker", str(seed), str(index), str(total - index),
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


def check_fuzz(script, seed=None, mutations=None):
    """The fuzz test itself: runs `script`'s mutations against ctprune's library (skips where it is not built), prints
    the counts and fails on any crash, hang, harness error, disagreement, unclear error, or node the kernel ran that
    the function refuses (outside the C API's blind spot)."""
    from ctprune.runtime import kernel_library_path

    seed = SEED if seed is None else seed
    mutations = MUTATIONS if mutations is None else mutations
    try:
        library = kernel_library_path()
    except Exception as err:
        pytest.skip(f"kernel library not built: {err}")
    results, crashes, hangs = fuzz(script, seed, mutations, library)
    counts = {s: sum(r["status"] == s for r in results)
              for s in ("error", "compared", "function-refused", "harness-error")}
    counts["of them the C API's blind spot"] = sum(r.get("api_gap", False) for r in results)
    wrong = [r for r in results if r["status"] == "compared" and r["problem"]]
    print(f"fuzz seed {seed}: {mutations} mutations of {os.path.basename(script)}, {counts}, crashes {len(crashes)}, "
          f"hangs {len(hangs)}, mismatches {len(wrong)}, library {library}")
    where = f"FUZZ_SEED={seed}"
    assert not crashes, f"{where}: crashes at mutations {[c['index'] for c in crashes]}: {crashes[0]}"
    assert not hangs, f"{where}: hangs at mutations {hangs}"
    assert len(results) == mutations, where
    broken = [r for r in results if r["status"] == "harness-error"]
    assert not broken, f"{where}: the harness itself failed, e.g. {broken[0]}"
    assert not wrong, f"{where}: {len(wrong)} outputs differ from the function's, e.g. {wrong[0]}"
    unclear = [r for r in results if r["status"] == "error" and not r["clean"]]
    assert not unclear, f"{where}: errors that name neither the node nor the problem, e.g. {unclear[0]}"
    laxer = [r for r in results if r["status"] == "function-refused" and not r["api_gap"]]
    assert not laxer, f"{where}: the kernel ran what the function refuses, e.g. {laxer[0]}"
