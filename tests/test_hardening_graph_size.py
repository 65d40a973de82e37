"""Time grows with the graph, not faster (issue 18, item 5): `--epochs 0` on a chain of 5,000 small Convs takes
at most ~25x a chain of 500 (linear is ~10x; the per-Conv scans of every node this guards against made it ~100x),
onnxruntime's own session set-up left out (it grows faster than the graph: 12.7 of 36.6 s at 5,000 Convs on a Zen 4).

The chain: Conv 3x3 (4 -> 4 channels, 4x4 images) + Relu, N times, with value_info for every tensor as exporters
write it. Both runs in this process, one torch thread, the small one first after a warm-up, so start-up and imports
do not dilute the ratio."""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ctprune

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
CHANNELS, SIZE = 4, 4


def conv_chain(n: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, weights, previous = [], [], "x"
    for i in range(n):
        w = (rng.standard_normal((CHANNELS, CHANNELS, 3, 3)) * np.sqrt(1.0 / (9 * CHANNELS))).astype(np.float32)
        weights += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(CHANNELS, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [previous, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1],
                                   kernel_shape=[3, 3]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        previous = f"r{i}"
    nodes += [helper.make_node("GlobalAveragePool", [previous], ["g"], name="pool"),
              helper.make_node("Flatten", ["g"], ["y"], name="flatten")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", CHANNELS, SIZE, SIZE])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CHANNELS])], weights)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


class _SessionSetupClock:
    """Seconds spent inside onnxruntime's session creation, which is not ctprune's and grows faster than the graph
    (its graph optimizer: 4.2 s per session at 5,000 Convs on a Zen 4): the ratio is taken without it."""

    def __init__(self, monkeypatch):
        import onnxruntime as ort

        self.seconds = 0.0
        create = ort.InferenceSession._create_inference_session

        def timed(session, *args, **kwargs):
            start = time.perf_counter()
            try:
                return create(session, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        monkeypatch.setattr(ort.InferenceSession, "_create_inference_session", timed)


def _seconds(tmp_path, n: int, setup: _SessionSetupClock | None = None) -> float:
    """ctprune's own seconds for `--epochs 0` on a chain of n Convs (onnxruntime's session set-up taken out)."""
    model = tmp_path / f"chain{n}.onnx"
    onnx.save(conv_chain(n), model)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((16, CHANNELS, SIZE, SIZE)).astype(np.float32))
    start, set_up = time.perf_counter(), setup.seconds if setup else 0.0
    result = ctprune.prune(str(model), ratio=4, epochs=0, data=str(data), batch_size=8, quiet=True,
                           output=str(tmp_path / f"out{n}.onnx"))
    seconds = time.perf_counter() - start - ((setup.seconds - set_up) if setup else 0.0)
    kinds = [node.op_type for node in result.model.graph.node]
    # all but the first Conv pruned: PatternConvs with their Relus fused, or dense Convs where PatternConv would not
    # be faster (rewrite/pattern_cost.py), each with its Relu
    kept_dense = sum(row.get("form") == "dense-kept" for row in result.report["layers"])
    assert kinds.count("PatternConv") == n - 1 - kept_dense and kinds.count("Conv") == 1 + kept_dense
    assert kinds.count("Relu") == 1 + kept_dense
    return seconds


def test_time_grows_linearly_with_the_node_count(tmp_path, monkeypatch):
    setup = _SessionSetupClock(monkeypatch)
    _seconds(tmp_path, 20, setup)  # warm-up: imports, onnxruntime, the kernel library
    small = _seconds(tmp_path, 500, setup)
    large = _seconds(tmp_path, 5000, setup)
    assert setup.seconds > 0  # the clock saw onnxruntime's sessions
    print(f"--epochs 0: 500 Convs {small:.1f} s, 5,000 Convs {large:.1f} s ({large / small:.1f}x)")
    assert large / small < 25, f"500 Convs {small:.1f} s, 5,000 Convs {large:.1f} s: {large / small:.1f}x"
