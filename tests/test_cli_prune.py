"""End to end: `ctprune MODEL --ratio 8x` and `ctprune.prune(...)` — the output contract and every user error.

Runs in-process through ctprune.cli.run (the console script's body) to stay fast; one subprocess run checks that a user
error prints no traceback.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import ctprune
from ctprune.cli import run
from tests.conftest import rel_err, run_ort
from tests.graph_nets import export

CONTRACT_KEYS = {"ratio_target", "ratio_achieved", "method", "conv_weights", "params", "macs", "accuracy", "agreement",
                 "latency_ms", "train", "layers"}


@pytest.fixture(scope="module")
def resnet_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "resnet.onnx"
    onnx.save(export("resnet", "torchscript17", size=16), path)
    return path


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _cli(capsys, *args):
    code = run([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _kernels_built() -> bool:
    try:
        ctprune.kernel_library_path()
        return True
    except ctprune.CtpruneError:
        return False


def test_prune_8x_obeys_the_output_contract(resnet_path, tmp_path, capsys):
    before = _digest(resnet_path)
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    code, stdout, stderr = _cli(capsys, resnet_path, "--ratio", "8x", "-o", out, "--report", report_path,
                                "--epochs", "0", "--seed", "3")
    assert code == 0, stderr
    assert _digest(resnet_path) == before, "the input model was modified"
    assert "ratio (prunable layers)" in stdout and "PatternConv" in stdout

    report = json.loads(report_path.read_text())
    assert CONTRACT_KEYS <= set(report)
    assert report["ratio_target"] == 8.0
    assert report["ratio_achieved"] == pytest.approx(8.0, rel=0.02)
    assert report["conv_weights"]["before"] / report["conv_weights"]["after"] == pytest.approx(report["ratio_achieved"])
    assert report["params"]["after"] < report["params"]["before"]
    assert report["macs"]["after"] < report["macs"]["before"]
    assert report["accuracy"] is None and report["agreement"] is None  # no eval data
    assert sum(l["weights_before"] for l in report["layers"]) == report["conv_weights"]["before"]

    original, pruned = onnx.load(resnet_path), onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    assert [(i.name, i.type) for i in pruned.graph.input] == [(i.name, i.type) for i in original.graph.input]
    assert [(o.name, o.type) for o in pruned.graph.output] == [(o.name, o.type) for o in original.graph.output]
    ops = {n.name: n.op_type for n in pruned.graph.node if n.domain == "ai.ctprune"}
    forms = {"pattern": "PatternConv", "sparse": "SparseConv"}
    assert len([l for l in report["layers"] if l["form"] == "pattern"]) >= 5
    for layer in report["layers"]:  # every pruned layer is its op, or a dense op said to be kept (and why)
        if layer["form"] == "dense-kept":
            assert layer["name"] not in ops and "kept dense" in layer["note"]
        else:
            assert ops[layer["name"]] == forms[layer["form"]]
    assert {f.name for f in pruned.functions if f.domain == "ai.ctprune"} == set(ops.values())
    assert {d["name"] for d in report["dense_layers"]} >= {n.name for n in original.graph.node if n.op_type == "Conv"} - {
        l["name"] for l in report["layers"]}


def test_pruned_model_equals_the_masked_dense_model(resnet_path):
    result = ctprune.prune(str(resnet_path), ratio=8, epochs=0, seed=5)
    x = np.random.default_rng().standard_normal((3, 3, 16, 16)).astype(np.float32)
    want = run_ort(result.masked_dense, x)[0]
    # the masked dense model really is masked: 3x3 weights hold at most 4 nonzeros per kernel
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in result.masked_dense.graph.initializer}
    rewritten = {l["name"] for l in result.report["layers"] if l["form"] == "pattern"}
    for node in result.masked_dense.graph.node:
        if node.name in rewritten:
            w = inits[node.input[1]]
            assert (np.count_nonzero(w.reshape(-1, 9), axis=1) <= 4).all()
    plain = run_ort(result.model, x)[0]  # the model-local function, inlined by onnxruntime
    assert rel_err(plain, want) < 1e-4
    if _kernels_built():
        sess = ctprune.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
        fast = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        assert rel_err(fast, want) < 1e-4


def test_python_api_saves_atomically(resnet_path, tmp_path):
    result = ctprune.prune(str(resnet_path), ratio="4x", epochs=0)
    assert result.output_path is None
    saved = result.save(tmp_path / "api.onnx")
    assert saved.exists() and list(tmp_path.iterdir()) == [saved]
    assert onnx.load(saved).graph.node  # a full model, not a stub
    assert result.report["ratio_achieved"] == pytest.approx(4.0, rel=0.02)


def test_fine_tune_with_labelled_data_reports_accuracy(resnet_path, tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 3, 16, 16)).astype(np.float32)
    y = rng.integers(0, 10, 96).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    code, stdout, stderr = _cli(capsys, resnet_path, "--ratio", "4", "--data", tmp_path / "d.npz", "--eval-data",
                                tmp_path / "d.npz", "--epochs", "1", "--batch-size", "32", "--report",
                                tmp_path / "r.json", "-o", tmp_path / "o.onnx", "--quiet")
    assert code == 0, stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert 0.0 <= report["accuracy"]["before"] <= 1.0 and 0.0 <= report["accuracy"]["after"] <= 1.0
    assert 0.0 <= report["agreement"] <= 1.0
    assert report["train"]["epochs"] == 1 and report["train"]["seconds"] > 0
    assert not (tmp_path / "o.onnx.ckpt").exists(), "a finished run leaves no checkpoint behind"


# ---- user errors: one message, exit 2, no output, input untouched ------------------------------------------------


def _assert_user_error(capsys, tmp_path, args, *needles, model=None):
    out = tmp_path / "never.onnx"
    before = _digest(model) if model else None
    code, stdout, stderr = _cli(capsys, *args, "-o", out)
    assert code == 2, (code, stderr)
    assert stderr.startswith("ctprune: error: ") and "Traceback" not in stderr
    for needle in needles:
        assert needle in stderr, stderr
    assert not out.exists() and not list(tmp_path.glob(".never.onnx*"))
    if model:
        assert _digest(model) == before


@pytest.mark.parametrize("ratio", ["0.5x", "1", "abc", "-3x"])
def test_bad_ratio(resnet_path, tmp_path, capsys, ratio):
    _assert_user_error(capsys, tmp_path, [resnet_path, "--ratio", ratio], "ratio", model=resnet_path)


def test_unreachable_ratio_names_the_largest(resnet_path, tmp_path, capsys):
    _assert_user_error(capsys, tmp_path, [resnet_path, "--ratio", "5000x", "--epochs", "0"], "largest",
                       model=resnet_path)


def test_missing_model(tmp_path, capsys):
    _assert_user_error(capsys, tmp_path, [tmp_path / "nope.onnx", "--ratio", "8x"], "nope.onnx")


def test_corrupt_model(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    _assert_user_error(capsys, tmp_path, [bad, "--ratio", "8x"], "bad.onnx", model=bad)


def test_unsupported_ops_all_named(tmp_path, capsys):
    h = onnx.helper
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8, 8])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, x.type.tensor_type.shape.dim and [d.dim_value for d in x.type.tensor_type.shape.dim])
    nodes = [h.make_node("Conv", ["x", "w"], ["a"], name="conv", pads=[1, 1, 1, 1]),
             h.make_node("Hardmax", ["a"], ["b"], name="hm"),
             h.make_node("Shrink", ["b"], ["c"], name="shrink1"), h.make_node("Shrink", ["c"], ["y"], name="shrink2")]
    w = onnx.numpy_helper.from_array(np.ones((4, 4, 3, 3), np.float32), "w")
    path = tmp_path / "unsup.onnx"
    onnx.save(h.make_model(h.make_graph(nodes, "g", [x], [y], [w]), opset_imports=[h.make_opsetid("", 17)]), path)
    _assert_user_error(capsys, tmp_path, [path, "--ratio", "8x"], "Hardmax", "Shrink", "'hm'", "'shrink1'", "'shrink2'",
                       model=path)


def test_model_without_prunable_conv(tmp_path, capsys):
    h = onnx.helper
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 4, 4])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, x.type.tensor_type.shape.dim and [d.dim_value for d in x.type.tensor_type.shape.dim])
    w = onnx.numpy_helper.from_array(np.ones((8, 8, 1, 1), np.float32), "w")
    path = tmp_path / "pointwise.onnx"
    onnx.save(h.make_model(h.make_graph([h.make_node("Conv", ["x", "w"], ["y"], name="pw")], "g", [x], [y], [w]),
                           opset_imports=[h.make_opsetid("", 17)]), path)
    _assert_user_error(capsys, tmp_path, [path, "--ratio", "8x", "--epochs", "0", "--method", "pattern"], "no Conv",
                       "1x1 kernel", model=path)
    # auto would prune the 1x1 Conv sparse, but it is the network's first: kept dense, and said so
    _assert_user_error(capsys, tmp_path, [path, "--ratio", "8x", "--epochs", "0"], "no layer ctprune can prune",
                       "pw: first Conv", model=path)


def test_data_that_does_not_fit(resnet_path, tmp_path, capsys):
    np.savez(tmp_path / "wrong.npz", x=np.zeros((8, 3, 20, 20), np.float32))
    _assert_user_error(capsys, tmp_path, [resnet_path, "--ratio", "8x", "--data", tmp_path / "wrong.npz"],
                       "wrong.npz", model=resnet_path)


def test_labels_out_of_range(resnet_path, tmp_path, capsys):
    np.savez(tmp_path / "labels.npz", x=np.zeros((8, 3, 16, 16), np.float32), y=np.full(8, 12, np.int64))
    _assert_user_error(capsys, tmp_path, [resnet_path, "--ratio", "8x", "--data", tmp_path / "labels.npz"],
                       "labels.npz", "10", model=resnet_path)


def test_user_error_prints_no_traceback_from_the_console(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ctprune", str(tmp_path / "missing.onnx"), "--ratio", "8x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "missing.onnx" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_refuses_to_overwrite_the_input(resnet_path, capsys):
    before = _digest(resnet_path)
    code, _, stderr = _cli(capsys, resnet_path, "--ratio", "8x", "-o", resnet_path)
    assert code == 2 and "never overwrites" in stderr
    assert _digest(resnet_path) == before


def test_macs_allocation_cuts_more_macs_at_the_same_ratio(resnet_path, tmp_path, capsys):
    # 8x: at 6x the AVX-512 tier's single-filter PatternConv would not be faster than dense (rewrite/pattern_cost.py),
    # every layer stays a dense Conv and counts all its multiply-adds, whatever the allocation
    reports = {}
    for allocation in ("importance", "balanced", "macs"):
        report_path = tmp_path / f"{allocation}.json"
        code, _, stderr = _cli(capsys, resnet_path, "--ratio", "8x", "-o", tmp_path / f"{allocation}.onnx", "--report",
                               report_path, "--epochs", "0", "--allocation", allocation, "--quiet")
        assert code == 0, stderr
        reports[allocation] = json.loads(report_path.read_text())
    for report in reports.values():
        assert report["ratio_achieved"] == pytest.approx(8.0, rel=0.02)
    after = {allocation: report["macs"]["after"] for allocation, report in reports.items()}
    assert after["macs"] <= after["balanced"] < after["importance"]
    code, _, stderr = _cli(capsys, resnet_path, "--ratio", "6x", "--epochs", "0", "--allocation", "latency")
    assert code != 0 and "allocation" in stderr


def test_a_model_that_gives_one_answer_is_reported():
    """A pruned model predicting one class for every input (while the dense model does not) gets a warning in the
    report's notes; a model that still discriminates gets none."""
    from types import SimpleNamespace

    import numpy as np

    from ctprune.pipeline import Pipeline

    rng = np.random.default_rng()
    dense = rng.integers(0, 10, 200)
    run = SimpleNamespace(notes=[])
    Pipeline._warn_if_one_answer(run, dense, np.full(200, 3))
    assert len(run.notes) == 1 and "class 3 for every one of the 200" in run.notes[0]
    Pipeline._warn_if_one_answer(run, dense, rng.integers(0, 10, 200))
    Pipeline._warn_if_one_answer(run, np.full(200, 3), np.full(200, 3))  # the dense model answers the same: no news
    assert len(run.notes) == 1
