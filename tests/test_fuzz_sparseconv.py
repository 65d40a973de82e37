"""Fuzzing SparseConv's kernel: mutations of valid nodes must end in a clean onnxruntime error or in the function's
own answer, never in a crash, a hang or a different answer.

Each mutation starts from a valid random SparseConv node (ops/SparseConv.md), a Conv (any kernel size up to 5x5,
strides, pads, dilations, groups) or an FC (uint16 columns, now and then int32 ones past 65536 inputs), built from a
random block mask with ctprune's compactor (ctprune.lab.layer_model, ctprune.rewrite.sparse_conv), and changes one to
three things: an attribute's type, length or values (huge and negative numbers, NaN/Inf bounds and gate parameters), a
missing or unknown attribute, block, block_order (a swap keeps it a permutation: both must then read the same rows
differently), weight_shape, group, the Conv geometry (or Conv geometry on an FC), the activation; the compact inputs'
values, shapes and dtypes (P's pointers, I's columns, W's rows and lanes), W, I or P as a runtime input instead of an
initializer; the shapes of X, B and Z; NaN/+-Inf in X, W, B and Z. The kernel (ctprune's library) runs it; when it
returns an output, the model-local function (ops/sparse_reference.py, plain onnxruntime) runs the same node and the two
must agree. Each mutation runs on a random kernel tier of this CPU with the 1x1 path's size thresholds at their defaults
or forced, into an output poisoned with NaN (kernel_paths). The runner, the comparison, the crash and hang accounting
and the seeds (FUZZ_SEED, FUZZ_MUTATIONS, default 500; FUZZ_TIMEOUT) are tests/fuzz_harness.py's; `make asan` runs this
test against the library built with AddressSanitizer.
"""

from __future__ import annotations

import functools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the worker runs this file as a script
from fuzz_harness import (ATTRIBUTE_MUTATIONS, HUGE, MAX_ELEMENTS, SPECIAL_FLOATS, add_attributes,  # noqa: E402
                          check_fuzz, mutate_attribute, mutate_b, mutate_x, run_kernel_and_function, worker_main)

COMPACT = {"w": "W", "i": "I", "p": "P"}  # case keys of the compact inputs and their names in the node


# ---------------------------------------------------------------------------------------------------------------------
# One mutation (runs in the worker process)


def activation_choice(rng):
    from ctprune.rewrite.sparse_conv import Activation

    return [Activation.none(), Activation.relu(), Activation.clip(0.0, 6.0), Activation.clip(-0.5, 0.5),
            Activation.hard_swish(), Activation.hard_sigmoid_mul(0.2, 0.5), Activation.silu()][int(rng.integers(0, 7))]


def valid_case(rng):
    from ctprune.lab.layer_model import masked_random_weight, random_block_mask
    from ctprune.rewrite.sparse_conv import compact_sparse_from_dense

    block = int(rng.choice([1, 2, 4, 8]))
    N = int(rng.integers(1, 3))
    if rng.random() < 0.3:  # an FC; now and then past 65536 inputs, where the columns are int32
        wide = rng.random() < 0.05
        O, I = int(rng.integers(1, 5 if wide else 13)), int(rng.integers(65537, 70000) if wide else rng.integers(1, 41))
        weight_shape, group, geometry = [O, I], 1, {}
        x_shape, y_shape = (N, I), (N, O)
    else:
        group = int(rng.choice([1, 1, 1, 2, 3]))
        O, Cg = group * int(rng.integers(1, 7)), int(rng.integers(1, 6))
        kh, kw = (int(rng.choice([1, 1, 2, 3, 3, 5])) for _ in range(2))
        strides = [int(v) for v in rng.integers(1, 4, 2)]
        dilations = [int(v) for v in rng.integers(1, 3, 2)]
        pads = [int(v) for v in rng.integers(0, 3, 4)]
        span_h, span_w = dilations[0] * (kh - 1) + 1, dilations[1] * (kw - 1) + 1
        H = int(rng.integers(max(1, span_h - pads[0] - pads[2]), span_h + 9))
        W = int(rng.integers(max(1, span_w - pads[1] - pads[3]), span_w + 9))
        weight_shape, geometry = [O, Cg, kh, kw], dict(strides=strides, pads=pads, dilations=dilations)
        x_shape = (N, group * Cg, H, W)
        y_shape = (N, O, (H + pads[0] + pads[2] - span_h) // strides[0] + 1,
                   (W + pads[1] + pads[3] - span_w) // strides[1] + 1)
    density = float(rng.choice([0.0, 0.1, 0.3, 0.6, 1.0]))
    mask = random_block_mask(rng, weight_shape, density, block, group, empty_blocks=int(rng.integers(0, 3)))
    compact = compact_sparse_from_dense(masked_random_weight(rng, mask), block, group=group, mask=mask)
    attrs = dict(compact.attributes(), **geometry, **activation_choice(rng).attributes())
    b = rng.standard_normal(O).astype(np.float32) if rng.random() < 0.7 else None
    z_kind = int(rng.integers(0, 3))
    z = None if z_kind == 0 else rng.standard_normal((1,) if z_kind == 1 else y_shape).astype(np.float32)
    return dict(attrs=attrs, kinds={}, x=rng.standard_normal(x_shape).astype(np.float32), w=compact.values.copy(),
                i=compact.columns.copy(), p=compact.pointer.copy(), b=b, z=z, runtime=[])


def mutate_attributes(rng, case, kind):
    """One change to the attributes (`kind`); returns its description."""
    if kind in ATTRIBUTE_MUTATIONS:
        return mutate_attribute(rng, case, kind)
    a = case["attrs"]
    if kind == "order":
        order = a.get("block_order")
        if not isinstance(order, list) or len(order) < 2:
            return "order (too few blocks)"
        i, j = (int(v) for v in rng.choice(len(order), 2, replace=False))
        order[i], order[j] = order[j], order[i]
        return f"swap block_order {i}, {j}"
    if kind == "geometry":  # on an FC too, where only the defaults are allowed
        name = str(rng.choice(["strides", "pads", "dilations", "group", "all"]))
        if name in ("strides", "all"):
            a["strides"] = [int(v) for v in rng.choice([1, 2, 3], 2)]
        if name in ("pads", "all"):
            a["pads"] = [int(v) for v in rng.integers(0, 4, 4)]
        if name in ("dilations", "all"):
            a["dilations"] = [int(v) for v in rng.choice([1, 2, 3], 2)]
        if name in ("group", "all"):
            a["group"] = int(rng.choice([1, 2, 3]))
        return f"geometry {name}: " + ", ".join(f"{n} {a.get(n)}" for n in ("strides", "pads", "dilations", "group"))
    if kind == "activation":
        name = str(rng.choice(["activation", "activation_min", "activation_max", "activation_alpha",
                               "activation_beta", "bounds"]))
        if name == "activation":
            a[name] = int(rng.choice([-1, 0, 1, 2, 3, 2**31]))
        elif name == "bounds":
            a["activation_min"], a["activation_max"] = (float(v) for v in rng.choice(SPECIAL_FLOATS, 2))
        else:
            a[name] = float(rng.choice(SPECIAL_FLOATS + [0.2, 0.5, -3.0]))
        return f"{name}: " + ", ".join(f"{a.get(n)}" for n in ("activation", "activation_min", "activation_max",
                                                                "activation_alpha", "activation_beta"))
    if kind == "block":
        block = int(rng.choice([0, 1, 2, 3, 4, 8, 16]))
        a["block"] = block
        if rng.random() < 0.5 and case["w"].ndim == 2 and 0 < block <= 16:  # W's lanes follow, so W's check passes
            w = np.zeros((case["w"].shape[0], block), case["w"].dtype)
            lanes = min(block, case["w"].shape[1])
            w[:, :lanes] = case["w"][:, :lanes]
            case["w"] = w
            return f"block {block} (W's lanes too)"
        return f"block {block}"
    if kind == "weight_shape":
        shape = a.get("weight_shape")
        if not isinstance(shape, list) or not shape:
            return "weight_shape (none)"
        d = int(rng.integers(0, len(shape)))
        shape[d] = max(0, shape[d] + int(rng.choice([-1, 1, 2])))
        return f"weight_shape {shape}"
    assert kind == "group", kind
    a["group"] = int(rng.choice([0, 1, 2, 3, 4, -1]))
    if rng.random() < 0.5 and case["x"].ndim == 4 and isinstance(a.get("weight_shape"), list) \
            and len(a["weight_shape"]) == 4 and a["group"] > 0:  # X's channels follow, so X's check passes
        shape = list(case["x"].shape)
        shape[1] = a["group"] * a["weight_shape"][1]
        if 0 <= int(np.prod(shape, dtype=object)) <= MAX_ELEMENTS:
            case["x"] = rng.standard_normal(shape).astype(np.float32)
            return f"group {a['group']} (X {shape})"
    return f"group {a['group']}"


def retyped(array, dtype):
    """`array`'s values as `dtype` (integers wrap, as a careless writer's would)."""
    return np.asarray(array).astype(np.int64).astype(dtype) if np.dtype(dtype).kind in "iu" else \
        np.asarray(array).astype(dtype)


def mutate_index(rng, case, key):
    """One change to P (`key` "p") or I ("i"): a value, the shape, the dtype or two swapped entries."""
    t = case[key]
    how = int(rng.integers(0, 4))
    if how == 0 and t.size:
        at = int(rng.integers(0, t.size))
        flat = t.astype(np.int64).reshape(-1)
        flat[at] = int(rng.choice([flat[at] - 1, flat[at] + 1, -1, 0, 65535, 65536, 2**31 - 1, int(rng.choice(HUGE)),
                                   flat[at - 1] if at else flat[at]]))
        case[key] = retyped(flat.reshape(t.shape), t.dtype)
        return f"{COMPACT[key]}[{at}] = {case[key].reshape(-1)[at]}"
    if how == 1:
        shape = [[max(0, t.size - 1)], [t.size + 1], [1, t.size], [0]][int(rng.integers(0, 4))]
        flat = np.resize(t.reshape(-1), int(np.prod(shape))) if t.size else np.zeros(int(np.prod(shape)), t.dtype)
        if len(shape) == 1 and shape[0] == t.size + 1 and t.size:
            flat[-1] = flat[-2]  # P's last pointer repeated: an empty block too many
        case[key] = flat.reshape(shape).astype(t.dtype)
        return f"{COMPACT[key]} shape {shape}"
    if how == 2:
        dtype = str(rng.choice(["int64", "uint16", "int32", "int16", "int8", "uint32", "float32"]))
        case[key] = retyped(t, dtype)
        return f"{COMPACT[key]} as {dtype}"
    if t.size >= 2:
        i, j = (int(v) for v in rng.choice(t.size, 2, replace=False))
        flat = t.reshape(-1).copy()
        flat[i], flat[j] = flat[j], flat[i]
        case[key] = flat.reshape(t.shape)
        return f"{COMPACT[key]} swap {i}, {j}"
    return f"{COMPACT[key]} (too short to swap)"


def mutate_tensors(rng, case, kind):
    """One change to the inputs (`kind`); returns its description."""
    if kind == "x":
        return mutate_x(rng, case)
    if kind in ("p", "i"):
        return mutate_index(rng, case, kind)
    if kind == "w":
        k, block = (case["w"].shape[0], case["w"].shape[-1]) if case["w"].ndim else (1, 1)
        how = int(rng.integers(0, 9))
        if how == 7:
            dtype = str(rng.choice(["float64", "float16"]))
            case["w"] = case["w"].astype(dtype)
            return f"W as {dtype}"
        if how == 8:  # a kept weight is never 0: the zeros are the padding lanes of partial blocks, which mean nothing
            pad = case["w"] == 0
            case["w"][pad] = rng.choice([np.nan, np.inf, -np.inf, 1e30, 1.0], int(pad.sum()))
            return f"W's {int(pad.sum())} padding lanes non-zero"
        shape = [[k + 1, block], [max(0, k - 1), block], [k, block + 1], [k, max(0, block - 1)], [k * block],
                 [k, block, 1], []][how]
        case["w"] = rng.standard_normal(shape).astype(np.float32)
        return f"W shape {shape}"
    if kind == "runtime":
        name = str(rng.choice(["w", "i", "p"]))
        if name not in case["runtime"]:
            case["runtime"].append(name)
        return f"{COMPACT[name]} a graph input"
    if kind == "b":
        return mutate_b(rng, case)
    if kind == "z":
        y = list(case["z"].shape) if case["z"] is not None and case["z"].ndim > 1 else [1, 1]
        shape = [[1], [2], [1] * len(y), y[:-1] + [y[-1] + 1], list(case["x"].shape), []][int(rng.integers(0, 6))]
        case["z"] = rng.standard_normal(shape).astype(np.float32)
        return f"Z shape {shape}"
    which = str(rng.choice(["x", "w", "b", "z"]))
    t = case[which]
    if t is not None and t.size and t.dtype.kind == "f":
        count = int(rng.integers(1, 4))
        t.reshape(-1)[rng.integers(0, t.size, count)] = rng.choice([np.nan, np.inf, -np.inf], count)
    return f"non-finite in {which}"


def mutate(rng, case):
    """Applies one random mutation to `case` in place; returns its description."""
    kind = str(rng.choice(["retype", "relength", "revalue", "drop", "extra", "order", "geometry", "activation",
                           "block", "weight_shape", "group", "p", "i", "w", "runtime", "x", "b", "z", "nonfinite"]))
    if kind in ("p", "i", "w", "runtime", "x", "b", "z", "nonfinite"):
        return mutate_tensors(rng, case, kind)
    return mutate_attributes(rng, case, kind)


def build(case, with_function: bool):
    from onnx import TensorProto, helper, numpy_helper

    from ctprune.ops.sparse_reference import sparse_conv_function

    inputs = ["X", "W", "I", "P", "B" if case["b"] is not None else ""] + (["Z"] if case["z"] is not None else [])
    while inputs and inputs[-1] == "":
        inputs.pop()
    node = helper.make_node("SparseConv", inputs, ["Y"], domain="ai.ctprune", name="fuzzed")
    add_attributes(node, case)
    inits = [numpy_helper.from_array(case[key], name) for key, name in COMPACT.items() if key not in case["runtime"]]
    if case["b"] is not None:
        inits.append(numpy_helper.from_array(case["b"], "B"))
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)]
    graph_inputs += [helper.make_tensor_value_info(COMPACT[key], helper.np_dtype_to_tensor_dtype(case[key].dtype), None)
                     for key in case["runtime"]]
    if case["z"] is not None:
        graph_inputs.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, None))
    graph = helper.make_graph([node], "fuzz", graph_inputs,
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    functions = [sparse_conv_function(17, residual=case["z"] is not None)] if with_function else []
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.ctprune", 1)],
                              functions=functions)
    model.ir_version = 8
    return model.SerializeToString()


@functools.lru_cache(maxsize=1)
def cpu_tiers():
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return ["generic", "generic16"] + (["avx2"] if " avx2 " in flags and " fma " in flags else []) \
        + (["avx512"] if " avx512f " in flags and " avx512vl " in flags else [])


def kernel_paths(seed, index):
    """The environment the kernel runs one mutation with, from the mutation's own stream (the case does not depend on
    it): a random tier this CPU runs (CTPRUNE_FORCE_ISA), the 1x1 path's thresholds at their defaults or forced on
    small inputs (non-finite check fused into the tile loop, streaming stores, passes of one tile), and the output
    poisoned with NaN first, so that an output the kernel never writes shows as a NaN mask the function lacks."""
    rng = np.random.default_rng([seed, index, 1])
    return {"CTPRUNE_FORCE_ISA": str(rng.choice(cpu_tiers())), "CTPRUNE_POISON_OUTPUT": "1",
            "CTPRUNE_SPARSE_FUSED_CHECK_BYTES": str(rng.choice([0, 1 << 20])),
            "CTPRUNE_SPARSE_STREAM_BYTES": str(rng.choice([0, 2 << 20])),
            "CTPRUNE_SPARSE_PASS_BYTES": str(rng.choice([1, 128 << 10]))}


def run_one(seed, index, library):
    paths = kernel_paths(seed, index)
    os.environ.update(paths)  # read when the kernel is created
    rng = np.random.default_rng([seed, index])
    case = valid_case(rng)
    what = [mutate(rng, case) for _ in range(int(rng.integers(1, 4)))]
    feeds = {"X": case["x"]}
    feeds.update({COMPACT[key]: case[key] for key in case["runtime"]})
    if case["z"] is not None:
        feeds["Z"] = case["z"]
    # SparseConv has no list that may be empty (block_order has NB >= 1 entries, the geometry fixed lengths), so the
    # C API's reading of STRINGS / empty FLOATS as an empty INTS list never makes a node the kernel should refuse valid.
    return dict(run_kernel_and_function("SparseConv", build(case, False), build(case, True), feeds, library),
                mutations=what, tier=paths["CTPRUNE_FORCE_ISA"])


def test_fuzzed_nodes_never_crash_hang_or_disagree():
    check_fuzz(os.path.abspath(__file__))


if __name__ == "__main__":
    worker_main(run_one)
