"""ctprune.runtime: the kernel library is found, registered, and actually runs the PatternConv nodes.

Whether onnxruntime ran ctprune's kernel or inlined the model-local function is read from its own profile: each
executed node is an event with its op_name, so "PatternConv" appears only when the kernel ran, and the function's
body (Conv, ScatterND, ...) appears only when it was inlined."""

import json
import secrets

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import ctprune
from ctprune.runtime import session as runtime
from ctprune.errors import CtpruneError
from ctprune.lab.layer_model import pattern_and_dense_models, random_layer_patterns
from conftest import kernel_library_or_none, skip_without_library


needs_library = skip_without_library()


def executed_ops(model: onnx.ModelProto, feeds, tmp_path, options: ort.SessionOptions, library: bool) -> list[str]:
    """op_name of every node onnxruntime executed in one run, from its profile."""
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / ("with_library" if library else "plain"))
    if library:
        session = ctprune.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    else:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    with open(session.end_profiling()) as f:
        events = json.load(f)
    return [e["args"]["op_name"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]


def test_missing_library_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "LIBRARY_DIR", tmp_path)
    monkeypatch.delenv(runtime.LIBRARY_ENV, raising=False)
    with pytest.raises(CtpruneError, match="not built"):
        runtime.kernel_library_path()
    with pytest.raises(CtpruneError, match="not built"):
        ctprune.InferenceSession(b"")


def test_session_options_rejects_bad_thread_counts():
    with pytest.raises(CtpruneError, match="threads"):
        runtime.session_options(threads=0)


@needs_library
def test_library_path_and_options():
    path = runtime.kernel_library_path()
    assert path.endswith(".so") and "libctprune_ops" in path
    assert ctprune.kernel_library_path() == path
    assert runtime.session_options(threads=2).intra_op_num_threads == 2


@needs_library
def test_kernel_runs_with_library_and_function_without(tmp_path):
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    patterns = random_layer_patterns(rng, 16, 8, 0.4, 8, 2)
    pattern_model, dense_model, _ = pattern_and_dense_models(
        rng, patterns, ["N", 8, 10, 10], True, (1, 1), (1, 1, 1, 1), (0.0, 6.0)
    )
    feeds = {"X": rng.standard_normal((2, 8, 10, 10)).astype(np.float32)}

    with_library = executed_ops(pattern_model, feeds, tmp_path, runtime.session_options(threads=1), library=True)
    assert with_library == ["PatternConv"]
    plain = executed_ops(pattern_model, feeds, tmp_path, ort.SessionOptions(), library=False)
    assert "PatternConv" not in plain and "Conv" in plain

    want = ort.InferenceSession(dense_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    for source in (pattern_model, pattern_model.SerializeToString()):
        got = ctprune.InferenceSession(source).run(None, feeds)[0]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), f"seed {seed}"


@needs_library
def test_inference_session_from_path_with_own_options(tmp_path):
    rng = np.random.default_rng(secrets.randbits(32))
    pattern_model, dense_model, _ = pattern_and_dense_models(rng, random_layer_patterns(rng, 4, 3, 0.5, 4), [1, 3, 6, 6])
    path = tmp_path / "layer.onnx"
    onnx.save(pattern_model, path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    for source in (path, str(path)):
        session = ctprune.InferenceSession(source, sess_options=options)
        assert isinstance(session, ort.InferenceSession)
        x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
        want = ort.InferenceSession(dense_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
        np.testing.assert_allclose(session.run(None, {"X": x})[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_bench_models_table_and_cli(tmp_path, capsys):
    from ctprune.runtime.bench import bench_models, latency_ms, render_bench
    from ctprune.cli import run

    rng = np.random.default_rng(secrets.randbits(32))
    pattern_model, dense_model, _ = pattern_and_dense_models(rng, random_layer_patterns(rng, 8, 8, 0.3, 4), ["N", 8, 12, 12])
    dense_path, pattern_path = tmp_path / "dense.onnx", tmp_path / "pattern.onnx"
    onnx.save(dense_model, dense_path)
    onnx.save(pattern_model, pattern_path)

    rows = bench_models([dense_path, pattern_model], threads=1, batch=3, repeats=5, progress=False)
    assert [r.model for r in rows] == [str(dense_path), "#2 layer"]
    assert rows[0].runs_with == "onnxruntime"
    assert rows[1].runs_with == ("ctprune kernels" if kernel_library_or_none() else "reference function (library not built)")
    assert rows[0].speedup == 1.0 and all(r.median_ms > 0 and r.p10_ms <= r.median_ms <= r.p90_ms for r in rows)
    assert rows[1].speedup == pytest.approx(rows[0].median_ms / rows[1].median_ms)
    table = render_bench(rows)
    assert str(dense_path) in table and "batch 3" in table and "median of 5" in table

    lat = latency_ms(dense_model, pattern_model, threads=2, batch=2, repeats=3)
    assert set(lat) == {"dense", "pruned", "threads", "batch"} and lat["threads"] == 2 and lat["pruned"] > 0

    assert run(["bench", str(dense_path), str(pattern_path), "--repeats", "3", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert str(pattern_path) in out and "speedup" in out
    assert run(["bench", str(tmp_path / "missing.onnx")]) == 2
    assert "missing.onnx" in capsys.readouterr().err


def test_bench_refuses_a_wrong_fixed_batch(tmp_path):
    from ctprune.runtime.bench import bench_models

    rng = np.random.default_rng(0)
    _, dense_model, _ = pattern_and_dense_models(rng, random_layer_patterns(rng, 2, 2, 1.0, 2), [1, 2, 5, 5])
    with pytest.raises(CtpruneError, match="fixed batch of 1"):
        bench_models([dense_model], batch=4, repeats=3, progress=False)


def test_library_override_must_exist(tmp_path, monkeypatch):
    monkeypatch.setenv(runtime.LIBRARY_ENV, str(tmp_path / "nope.so"))
    with pytest.raises(CtpruneError, match="not a file"):
        runtime.kernel_library_path()
    (tmp_path / "custom.so").write_bytes(b"")
    monkeypatch.setenv(runtime.LIBRARY_ENV, str(tmp_path / "custom.so"))
    assert runtime.kernel_library_path() == str(tmp_path / "custom.so")


@needs_library
def test_options_registered_twice(tmp_path):
    rng = np.random.default_rng(0)
    pattern_model, _, _ = pattern_and_dense_models(rng, random_layer_patterns(rng, 2, 2, 1.0, 2), [1, 2, 5, 5])
    ours = runtime.session_options(threads=1)
    ctprune.InferenceSession(pattern_model, sess_options=ours)  # already registered by ctprune: not registered again
    by_hand = ort.SessionOptions()
    by_hand.register_custom_ops_library(runtime.kernel_library_path())
    with pytest.raises(CtpruneError, match="already had ctprune's kernel library"):
        ctprune.InferenceSession(pattern_model, sess_options=by_hand)
