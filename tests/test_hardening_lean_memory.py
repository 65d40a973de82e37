"""The pieces that keep a run's memory near one copy of the weights (issue 18, item 4): file-backed loading, the
lean allocation, block sums a few rows at a time, masks applied through views, pruned weights held out of the model
during the rewrite; and the whole run's peak RSS on VGG-19 in a child process."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from ctprune.errors import ModelLoadError
from ctprune.graph.filebacked import file_backed_array, is_file_backed, load_file_backed, materialized
from ctprune.pruning.allocation import LayerGroups, _relative_costs, _weight_bounds, allocate_groups
from ctprune.pruning.importance import MagnitudeImportance
from ctprune.pruning.layers import SparseTarget, mask_view
from ctprune.pruning.plan import SparseLayer
from ctprune.pruning.selection import block_importance
from tests.conftest import light_model_path, randomize_placeholders


def conv_net(rng, opset: int = 13) -> onnx.ModelProto:
    """Conv(3->32) Relu Conv(32->64) Relu GlobalAveragePool Flatten Gemm(64->10): only the 32->64 weight (73 kB) is
    over the default file-backed threshold (64 kB); the others need a lower one."""
    w1 = rng.standard_normal((32, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((64, 32, 3, 3)).astype(np.float32) * 0.1
    fc = rng.standard_normal((10, 64)).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(a, n) for a, n in
             ((w1, "w1"), (w2, "w2"), (fc, "fc"), (np.zeros(10, np.float32), "fcb"))]
    inits.append(helper.make_tensor("half", TensorProto.FLOAT16, [2], [1.0, 2.0]))  # not file-backed: kept inline
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], name="head", transB=1)]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _initializers(model) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("external", [False, True])
def test_file_backed_model_reads_back_every_weight(tmp_path, monkeypatch, external):
    import ctprune.graph.filebacked as fb

    monkeypatch.setattr(fb, "MIN_BYTES", 256)  # small tensors take the file-backed path too
    model = conv_net(np.random.default_rng(1))
    want = _initializers(model)
    path = tmp_path / "m.onnx"
    onnx.save(model, path, save_as_external_data=external, all_tensors_to_one_file=True, location="m.data",
              size_threshold=0)
    light = load_file_backed(path)
    backed = {t.name for t in light.graph.initializer if is_file_backed(t)}
    assert backed == {"w1", "w2", "fc"} | ({"fcb"} if external else set())  # float16 "half" is loaded inline
    assert light.ByteSize() < 4096  # no weight payload in the parsed model
    for t in light.graph.initializer:
        if is_file_backed(t):
            got = file_backed_array(t)
            assert got.flags.writeable and np.array_equal(got, want[t.name]), t.name
    back = _initializers(materialized(light))
    assert back.keys() == want.keys() and all(np.array_equal(back[k], want[k]) for k in want)


def test_file_backed_refuses_data_outside_the_folder_and_short_files(tmp_path):
    model = conv_net(np.random.default_rng(2))
    inner = tmp_path / "inner"
    inner.mkdir()
    onnx.save(model, inner / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    data = (inner / "m.data").read_bytes()
    (inner / "m.data").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="runs past the end"):
        load_file_backed(inner / "m.onnx")
    escaped = onnx.load(inner / "m.onnx", load_external_data=False)
    for t in escaped.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../m.data"
    (tmp_path / "m.data").write_bytes(data)
    onnx.save(escaped, inner / "escaped.onnx")
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        load_file_backed(inner / "escaped.onnx")
    (tmp_path / "junk.onnx").write_bytes(bytes([0x3A, 0xFF, 0xFF, 0x7F]))  # a length running past the end
    with pytest.raises(ModelLoadError):
        load_file_backed(tmp_path / "junk.onnx")


@pytest.mark.parametrize("method", ["auto", "pattern"])
def test_pruning_from_a_file_equals_pruning_from_bytes(tmp_path, method):
    """From a path the weights are file-backed and the pruned layers' weights never enter the rewritten model; from
    bytes the model is parsed whole and written back whole: the outputs must be the same model."""
    import ctprune

    model = conv_net(np.random.default_rng(3))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    common = dict(ratio=8.0, epochs=0, method=method, quiet=True, keep_masked_dense=False, first_conv_dense=False)
    from_file = ctprune.prune(str(path), **common).model
    from_bytes = ctprune.prune(path.read_bytes(), **common).model
    assert from_file.SerializeToString() == from_bytes.SerializeToString()
    assert any(n.domain == "ai.ctprune" for n in from_file.graph.node)


def _reference_allocation(layers, budget, spread, exponent):
    """The global ranking built whole: every layer's candidates by value, one stable sort of all of them."""
    costs = _relative_costs(layers)
    bounds = _weight_bounds(layers, budget, budget / sum(l.dense_weights for l in layers.values()), spread)
    keep, pools = {}, []
    for name, layer in layers.items():
        sizes = layer.sizes.double()
        l2 = float(torch.linalg.vector_norm(layer.scores, dtype=torch.float64))
        value = (layer.scores.float() / (l2 * costs[name] ** exponent)) / layer.sizes
        kept = layer.forced.clone()
        rest = torch.nonzero(~kept).reshape(-1)
        rest = rest[torch.sort(value[rest], descending=True, stable=True).indices]
        cum = torch.cumsum(sizes[rest], 0)
        have = float(sizes[kept].sum())
        lo, hi = bounds[name]
        n_lo = min(int(torch.searchsorted(cum, torch.tensor(lo - have - 1e-9, dtype=torch.float64))) + 1, len(rest)) if lo > have else 0
        n_hi = int(torch.searchsorted(cum, torch.tensor(hi - have, dtype=torch.float64), right=True))
        kept[rest[:n_lo]] = True
        cand = rest[n_lo:max(n_lo, n_hi)]
        pools.append((name, cand, value[cand], sizes[cand]))
        keep[name] = kept
    remaining = budget - sum(float(layers[n].sizes.double()[keep[n]].sum()) for n in layers)
    if remaining > 0:
        values = torch.cat([p[2] for p in pools])
        sizes = torch.cat([p[3] for p in pools])
        owner = torch.cat([torch.full((len(p[1]),), i) for i, p in enumerate(pools)])
        position = torch.cat([p[1] for p in pools])
        order = torch.sort(values, descending=True, stable=True).indices
        count = int(torch.searchsorted(torch.cumsum(sizes[order], 0), torch.tensor(remaining - 0.5, dtype=torch.float64)))
        for i in order[: count + 1].tolist():
            keep[pools[int(owner[i])][0]][position[i]] = True
    return keep


@pytest.mark.parametrize("seed", range(6))
def test_threshold_allocation_equals_one_global_sort(seed):
    """Ties included: scores drawn from a few values, so many groups of different layers share a value."""
    rng = np.random.default_rng(seed)
    layers = {}
    for i in range(int(rng.integers(2, 6))):
        n = int(rng.integers(20, 400))
        scores = torch.from_numpy(rng.integers(0, 6, n).astype(np.float32))
        sizes = torch.from_numpy(rng.choice([4.0, 8.0, 3.0], n).astype(np.float32))
        forced = torch.from_numpy(rng.random(n) < 0.05)
        layers[f"l{i}"] = LayerGroups(scores, sizes, forced, int(sizes.sum()) * 2, float(rng.uniform(0.5, 4)))
    total = sum(l.dense_weights for l in layers.values())
    for ratio in (2.5, 4.0, 8.0):
        for exponent in (0.0, 0.5, 1.0):
            budget = round(total / ratio)
            got = allocate_groups(layers, budget, spread=2.5, exponent=exponent)
            want = _reference_allocation(layers, budget, 2.5, exponent)
            for name in layers:
                assert torch.equal(got[name], want[name]), (seed, ratio, exponent, name)


def test_block_sums_by_rows_equal_the_whole_layer():
    torch.manual_seed(0)
    cases = [((37, 20, 3, 3), None), ((50, 13), SparseTarget(block=8, transposed=False, kind="fc")),
             ((13, 50), SparseTarget(block=4, transposed=True, kind="fc")), ((64, 16, 1, 1), None)]
    for shape, target in cases:
        view = mask_view(torch.randn(shape), target)
        magnitude = MagnitudeImportance({"l": view})
        magnitude.CHUNK_ELEMENTS = 97  # many chunks, most of them not whole blocks of rows
        for block in (1, 4, 8):
            want = block_importance(view.float().square(), block)
            assert torch.allclose(magnitude.block_sums("l", block), want, rtol=1e-6, atol=0), (shape, block)
        assert torch.equal(magnitude["l"], view.square())


def test_zero_removed_equals_the_float_mask():
    rng = np.random.default_rng(5)
    for shape, transposed, block in [((37, 20, 3, 3), False, 8), ((50, 13), False, 4), ((13, 50), True, 8),
                                     ((16, 8, 1, 1), False, 4)]:
        out_channels = shape[1] if transposed else shape[0]
        keep = rng.random((-(-out_channels // block), math.prod(shape) // out_channels)) < 0.3
        layer = SparseLayer(shape, block, transposed, keep, None, "fc" if len(shape) == 2 else "conv", out_channels)
        weight = torch.randn(shape)
        weight[0].fill_(float("nan"))  # a removed weight is exactly zero whatever it held
        want = torch.where(torch.from_numpy(layer.mask()) > 0, weight, torch.zeros(()))
        layer.zero_removed(weight)
        assert torch.equal(torch.nan_to_num(weight, nan=7.0), torch.nan_to_num(want, nan=7.0)), shape


VGG = light_model_path("vgg19")


@pytest.mark.skipif(not VGG.exists(), reason="light_vgg19 is not in this onnx wheel")
def test_vgg19_epochs0_peak_rss_is_at_most_three_times_the_model(tmp_path):
    """`ctprune light_vgg19.onnx --ratio 8x --epochs 0` (575 MB, weights inline) in a child process: its peak
    resident size, interpreter and libraries included, stays within 3x the model file."""
    path = tmp_path / "vgg19.onnx"
    onnx.save(randomize_placeholders(onnx.load(VGG), seed=0, inplace=True), path)
    size = path.stat().st_size
    # VmHWM, not getrusage's ru_maxrss: that one keeps the peak of the forked copy of this (large) test process
    # from before the exec
    child = ("import sys, ctprune.cli; code = ctprune.cli.run(sys.argv[1:]); "
             "print('peak', next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))); "
             "sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", child, str(path), "--ratio", "8x", "--epochs", "0", "--batch-size",
                           "1", "-o", str(tmp_path / "out.onnx"), "--quiet"], capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = int(proc.stdout.split("peak")[-1]) * 1024  # kB
    print(f"model {size / 1e9:.3f} GB, peak RSS {peak / 1e9:.3f} GB ({peak / size:.2f}x)")
    assert peak <= 3 * size, f"peak RSS {peak / 1e9:.2f} GB is {peak / size:.2f}x the {size / 1e9:.2f} GB model"
