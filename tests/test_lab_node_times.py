"""The per-layer benchmark's --node-times mode (ctprune/lab/node_times.py): onnxruntime's profile is parsed into each
contender's own node, the dense Conv's NCHWc reorders counted apart, every timed run and only those."""

import numpy as np
import pytest

from ctprune.lab import node_times
from ctprune.lab.bench_layers import WARMUP_RUNS, _time_pair, bench_layer, render, session, summary
from ctprune.lab.bench_sparse import bench_sparse_layer
from ctprune.lab.bench_sparse import render as render_sparse
from ctprune.lab.layer_model import sparse_and_dense_models
from ctprune.runtime import kernel_library_path

RUNS = 10  # two blocks of 5


@pytest.fixture(scope="module")
def library():
    return kernel_library_path()


def test_profile_parse_finds_each_node_and_drops_the_warmup(library):
    rng = np.random.default_rng(0)
    x_shape = (1, 32, 8, 8)
    sparse, dense, _ = sparse_and_dense_models(rng, (64, 32, 1, 1), x_shape, 0.125, 4, function=False)
    profiled = [session(dense, 1, profile=True), session(sparse, 1, library, profile=True)]
    _time_pair(profiled, rng.standard_normal(x_shape).astype(np.float32), RUNS, 5)
    dense_nodes = node_times.node_times(profiled[0], skip=WARMUP_RUNS)
    sparse_nodes = node_times.node_times(profiled[1], skip=WARMUP_RUNS)
    # A lone Conv with 32 and 64 channels runs as NCHWc: ReorderInput -> Conv -> ReorderOutput.
    assert sorted(t.op for t in dense_nodes.values()) == ["Conv", "ReorderInput", "ReorderOutput"]
    assert [t.op for t in sparse_nodes.values()] == ["SparseConv"]
    for t in list(dense_nodes.values()) + list(sparse_nodes.values()):
        assert len(t.us) == RUNS
        assert all(us >= 0 for us in t.us) and sum(t.us) > 0


def test_sparse_conv_and_fc_rows(library):
    rng = np.random.default_rng(1)
    conv = bench_sparse_layer("conv1x1", (32, 64, 8), 8.0, 4, 1, 1, library, rng, runs=RUNS, node_times=True)
    fc = bench_sparse_layer("fc", (64, 256), 8.0, 8, 1, 1, library, rng, runs=RUNS, node_times=True)
    for row in (conv, fc):
        assert row["node_runs"] == RUNS
        assert row["dense_node_us"] > 0 and row["op_node_us"] > 0
        assert row["node_speedup"] == pytest.approx(row["dense_node_us"] / row["op_node_us"])
    assert conv["reorder_us"] > 0  # the NCHWc reorders, apart from the Conv node
    assert fc["reorder_us"] == 0  # Gemm has none
    table = render_sparse([conv, fc])
    assert "SparseConv node us" in table and f"{conv['node_speedup']:.2f}x" in table
    assert all(line.count("|") == table.splitlines()[0].count("|") for line in table.splitlines())


def test_depthwise_rows_with_a_baseline_library(library):
    """--kinds depthwise: every weight kept, timed against onnxruntime's Conv; --baseline: the same layer on another
    build of the library (here the same one), in its own column, with node times too (the profiled sessions last)."""
    row = bench_sparse_layer("depthwise", (24, 7, 1, 3), 1.0, 1, 1, 1, library, np.random.default_rng(3), runs=RUNS,
                             node_times=True, baseline=library)
    assert row["achieved"] == pytest.approx(1.0) and row["dense_ms"] > 0 and row["sparse_ms"] > 0
    assert row["baseline_ms"] > 0 and row["baseline_speedup"] == pytest.approx(row["dense_ms"] / row["baseline_ms"])
    assert row["node_runs"] == RUNS and row["op_node_us"] > 0
    table = render_sparse([row])
    assert "C24 7x7 s1 k3" in table and "baseline library ms" in table
    assert all(line.count("|") == table.splitlines()[0].count("|") for line in table.splitlines())


def test_pattern_conv_row_and_default_output_unchanged(library):
    row = bench_layer(16, 8, 4.0, 1, 1, library, np.random.default_rng(2), runs=RUNS, node_times=True)
    assert row["node_runs"] == RUNS and row["dense_node_us"] > 0 and row["op_node_us"] > 0
    assert "PatternConv node us" in render([row]) and "median node speedup" in summary([row])
    plain = bench_layer(16, 8, 4.0, 1, 1, library, np.random.default_rng(2), runs=5)
    assert "node_speedup" not in plain
    assert "node" not in render([plain]) and "node" not in summary([plain])


def test_a_node_of_unknown_op_is_not_dropped():
    nodes = {"conv": node_times.NodeTimes("Conv", [5, 6]), "cast": node_times.NodeTimes("Cast", [1, 1])}
    with pytest.raises(ValueError, match="Cast"):
        node_times._the_node(nodes, node_times.DENSE_OPS, node_times.REORDER_OPS)


def test_one_session_mode_makes_one_session_per_block_and_drops_it(library, monkeypatch):
    """--one-session: session() hands out recipes, and _time_pair makes each contender's session for every block of
    runs and lets it go before the next one exists (a spinning pool of another session must not hold a core)."""
    import gc
    import weakref

    from ctprune.lab import bench_layers

    monkeypatch.setitem(bench_layers.ONE_SESSION, "on", True)
    rng = np.random.default_rng(2)
    x_shape = (1, 16, 8, 8)
    sparse, dense, _ = sparse_and_dense_models(rng, (32, 16, 1, 1), x_shape, 0.25, 4, function=False)
    recipes = [session(dense, 2), session(sparse, 2, library)]
    assert all(isinstance(r, bench_layers.SessionRecipe) for r in recipes)
    assert not isinstance(session(dense, 1, profile=True), bench_layers.SessionRecipe)  # profiles need kept sessions
    alive, made = [], []
    real_make = bench_layers._make_session

    def counting(*args, **kwargs):
        gc.collect()
        alive.append(sum(ref() is not None for ref in made))
        s = real_make(*args, **kwargs)
        made.append(weakref.ref(s))
        return s

    monkeypatch.setattr(bench_layers, "_make_session", counting)
    timed = _time_pair(recipes, rng.standard_normal(x_shape).astype(np.float32), RUNS, 5)
    assert len(made) == 2 * (RUNS // 5) and alive == [0] * len(made)
    assert all(0 < best <= median for median, best in timed)


def test_every_benchmark_session_stops_spinning_between_runs(library, monkeypatch):
    """Each session has its own onnxruntime pool; one left spinning after its run held the core the next contender's
    second thread needed (BENCHMARKS.md, fourteenth session): the per-layer and the whole-model benchmarks both ask
    onnxruntime to stop spinning when a run returns."""
    import onnxruntime as ort

    from ctprune.runtime import bench as runtime_bench

    rng = np.random.default_rng(3)
    sparse, dense, _ = sparse_and_dense_models(rng, (32, 16, 1, 1), (1, 16, 8, 8), 0.25, 4, function=False)
    for s in (session(dense, 2), session(sparse, 2, library), session(dense, 1, profile=True)):
        assert s.get_session_options().get_session_config_entry(runtime_bench.STOP_SPINNING_BETWEEN_RUNS) == "1"
    made = []
    real = ort.InferenceSession

    def recording(*args, **kwargs):
        s = real(*args, **kwargs)
        made.append(s)
        return s

    monkeypatch.setattr(runtime_bench.ort, "InferenceSession", recording)
    rows = runtime_bench.bench_models([dense, sparse], threads=2, repeats=3, progress=False)
    assert len(rows) == 2 and len(made) == 2
    for s in made:
        assert s.get_session_options().get_session_config_entry(runtime_bench.STOP_SPINNING_BETWEEN_RUNS) == "1"
