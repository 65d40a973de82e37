"""ctprune.InferenceSession and shared SessionOptions: one options object builds many sessions, from many threads.

The kernel library is registered into the caller's options once per options object (under a lock); registering it a
second time is what onnxruntime refuses ("Domain already set"), so a race there would fail 7 of 8 threads."""

import threading

import numpy as np
import onnxruntime as ort

import ctprune
from ctprune.lab.layer_model import pattern_and_dense_models, random_layer_patterns
from tests.conftest import rel_err, skip_without_library


pytestmark = skip_without_library()
THREADS = 8


def _models(seed=0):
    rng = np.random.default_rng(seed)
    pattern_model, dense_model, _ = pattern_and_dense_models(
        rng, random_layer_patterns(rng, 16, 8, 0.4, 4), ["N", 8, 12, 12])
    x = rng.standard_normal((2, 8, 12, 12)).astype(np.float32)
    return pattern_model, dense_model, x


def _in_threads(work):
    """Run work(i) in THREADS threads released together; (results by index, errors)."""
    results, errors = [None] * THREADS, []
    barrier = threading.Barrier(THREADS)

    def body(i):
        try:
            barrier.wait()
            results[i] = work(i)
        except Exception as exc:  # collected, so the test names every failure
            errors.append(repr(exc))

    threads = [threading.Thread(target=body, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def test_one_options_object_builds_sessions_in_eight_threads():
    pattern_model, dense_model, x = _models()
    reference = ort.InferenceSession(dense_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"X": x})[0]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    data = pattern_model.SerializeToString()

    def build_and_run(_):
        session = ctprune.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
        return session.run(None, {"X": x})[0]

    results, errors = _in_threads(build_and_run)
    assert errors == []
    for out in results:
        assert rel_err(out, reference) < 1e-5
        np.testing.assert_array_equal(out, results[0])
    assert options.intra_op_num_threads == 1  # the caller's settings are left as they were


def test_one_session_shared_by_eight_threads_gives_identical_outputs():
    pattern_model, dense_model, x = _models(1)
    reference = ort.InferenceSession(dense_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"X": x})[0]
    session = ctprune.InferenceSession(pattern_model, providers=["CPUExecutionProvider"])
    alone = session.run(None, {"X": x})[0]
    results, errors = _in_threads(lambda _: [session.run(None, {"X": x})[0] for _ in range(20)])
    assert errors == []
    for outs in results:
        for out in outs:
            np.testing.assert_array_equal(out, alone)
    assert rel_err(alone, reference) < 1e-5


def test_options_reused_one_after_another_and_by_plain_onnxruntime():
    pattern_model, _, x = _models(2)
    options = ort.SessionOptions()
    outs = [ctprune.InferenceSession(pattern_model, sess_options=options, providers=["CPUExecutionProvider"])
            .run(None, {"X": x})[0] for _ in range(3)]
    # the options now carry the library: plain onnxruntime with the same object runs the kernels too
    plain = ort.InferenceSession(pattern_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outs.append(plain.run(None, {"X": x})[0])
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])
