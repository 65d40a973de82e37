"""A pattern layer whose PatternConv would not be faster than onnxruntime's dense Conv stays a dense Conv holding its
zeros (rewrite/pattern_cost.py): the estimate, the block share it reads from the compact layout, and the rewrite."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import ctprune
from ctprune.lab.layer_model import masked_weight, random_layer_patterns
from ctprune.pruning.patterns import ALL_PATTERNS
from ctprune.rewrite.model import rewrite_model
from ctprune.rewrite.pattern_conv import LayerPatterns, compact_from_dense
from ctprune.rewrite.pattern_cost import BLOCK, PADDED_FROM, block_share, estimated_speedup, pattern_beats_dense
from ctprune.rewrite.sparse_cost import MARGIN


@pytest.mark.parametrize("tier, pixels, break_even_range", [
    ("avx2", None, (0.25, 0.3)), ("avx2", 16, (0.25, 0.3)),
    ("avx512", 196, (0.22, 0.26)), ("avx512", 16, (0.13, 0.16)), ("avx512", None, (0.13, 0.16)),
    ("avx512/zen4", 196, (0.33, 0.37)), ("avx512/zen4", 16, (0.21, 0.25)),
])
def test_the_estimate_falls_with_density_and_blocks_pay_where_single_filters_do_not(tier, pixels, break_even_range):
    densities = np.linspace(0.01, 4 / 9, 40)
    for share in (0.0, 0.5, 1.0):
        speed = [estimated_speedup(d, share, tier, pixels) for d in densities]
        assert all(a >= b for a, b in zip(speed, speed[1:])), share
    assert (estimated_speedup(4 / 9, 0.0, tier, pixels) < 1.0 < MARGIN
            < estimated_speedup(4 / 9, 1.0, tier, pixels))  # patterns alone
    assert estimated_speedup(1 / 8, 0.0, tier, pixels) > 1.1 and estimated_speedup(1 / 8, 1.0, tier, pixels) > 3.0
    break_even = next(d for d in densities if estimated_speedup(d, 0.0, tier, pixels) < MARGIN)
    assert break_even_range[0] < break_even < break_even_range[1], break_even


def test_the_estimate_follows_the_tier_this_machine_runs(monkeypatch):
    import ctprune.runtime.cpu as cpu

    monkeypatch.setattr(cpu, "cpu_model", lambda: None)
    for tier in ("avx2", "avx512"):
        monkeypatch.setattr(cpu, "kernel_tier", lambda tier=tier: tier)
        assert estimated_speedup(0.2, 0.3) == estimated_speedup(0.2, 0.3, tier)
    assert estimated_speedup(0.2, 0.0, "avx2") != estimated_speedup(0.2, 0.0, "avx512")


def test_a_core_generation_with_its_own_calibration_takes_it_and_others_take_the_tiers(monkeypatch):
    """Zen 4 runs the AVX-512 tier against a dense Conv half as fast as Zen 5's: its own constants; a core without
    a variant (or a forced tier that has none for it) falls back to the tier's (runtime/cpu.for_this_cpu)."""
    import ctprune.runtime.cpu as cpu

    monkeypatch.setattr(cpu, "kernel_tier", lambda: "avx512")
    for model, want in (("zen4", "avx512/zen4"), ("zen5", "avx512"), (None, "avx512")):
        monkeypatch.setattr(cpu, "cpu_model", lambda model=model: model)
        assert estimated_speedup(0.3, 0.0, pixels=196) == estimated_speedup(0.3, 0.0, want, 196), model
    monkeypatch.setattr(cpu, "kernel_tier", lambda: "avx2")
    monkeypatch.setattr(cpu, "cpu_model", lambda: "zen4")
    assert estimated_speedup(0.3, 0.0, pixels=196) == estimated_speedup(0.3, 0.0, "avx2", 196)
    # Zen 4's per-filter path pays from about 2.8x, Zen 5's from about 4x
    assert estimated_speedup(0.3, 0.0, "avx512/zen4", 196) > MARGIN > estimated_speedup(0.3, 0.0, "avx512", 196)


def _block_patterns(rng, o, c, runs, kept=4):
    """Filters cut into runs of the given sizes (the rest single), a run's filters keeping the same kernels."""
    library = ALL_PATTERNS[rng.choice(len(ALL_PATTERNS), 8, replace=False)]
    assignment = np.full((o, c), -1, dtype=np.int64)
    blocks = np.empty(o, dtype=np.int64)
    order = rng.permutation(o)
    start, block_id = 0, 0
    for size in list(runs) + [1] * (o - sum(runs)):
        members = order[start:start + size]
        row = np.full(c, -1, dtype=np.int64)
        row[rng.choice(c, kept, replace=False)] = rng.integers(0, 8, kept)
        assignment[members] = row
        blocks[members] = block_id
        start, block_id = start + size, block_id + 1
    return LayerPatterns(library=library, assignment=assignment, blocks=blocks)


@pytest.mark.parametrize("runs, expected", [((16, 16), 1.0), ((16, 5), 16 / 21), ((16, PADDED_FROM), 1.0),
                                            ((PADDED_FROM - 1,), 0.0), ((), 0.0), ((BLOCK + 3,), 16 / 19)])
def test_block_share_counts_the_kernels_the_block_path_runs(runs, expected):
    rng = np.random.default_rng()
    o = max(sum(runs), 4)
    patterns = _block_patterns(rng, o, 12, runs)
    weight = masked_weight(rng, patterns)
    got = block_share(compact_from_dense(weight, patterns))
    # every filter keeps 4 kernels, so the share is the share of filters; single filters add to the denominator
    assert got == pytest.approx(expected * sum(runs) / o if runs else 0.0), (runs, got)


def _conv_model(weight: np.ndarray, hw: int) -> onnx.ModelProto:
    o, c = weight.shape[:2]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "one_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, o, hw, hw])],
        [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("kept_fraction, blocked, becomes", [(1.0, False, "Conv"), (0.25, False, "PatternConv"),
                                                              (1.0, True, "PatternConv")])
def test_rewrite_keeps_a_layer_dense_where_patternconv_would_not_be_faster(kept_fraction, blocked, becomes):
    rng = np.random.default_rng()
    o, c, hw = 32, 16, 10
    patterns = (_block_patterns(rng, o, c, (16, 16), kept=c) if blocked
                else random_layer_patterns(rng, o, c, kept_fraction=kept_fraction))
    weight = masked_weight(rng, patterns)
    model = _conv_model(weight, hw)
    kept_dense: dict[str, str] = {}
    out = rewrite_model(model, {"conv": patterns}, kept_dense=kept_dense, check_pattern_speed=True)
    assert [n.op_type for n in out.graph.node if n.op_type in ("Conv", "PatternConv")] == [becomes]
    faster, density, _ = pattern_beats_dense(compact_from_dense(weight, patterns))
    assert faster == (becomes == "PatternConv")
    assert ("conv" in kept_dense) == (becomes == "Conv")
    if becomes == "Conv":
        assert f"density {density:.3f}" in kept_dense["conv"] and "kept dense" in kept_dense["conv"]
    unchecked = rewrite_model(model, {"conv": patterns})  # the default: every pattern layer a PatternConv
    assert [n.op_type for n in unchecked.graph.node if n.op_type in ("Conv", "PatternConv")] == ["PatternConv"]
    x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ctprune.InferenceSession(out.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_break_even_density_is_where_the_estimate_crosses_the_margin():
    from ctprune.rewrite.pattern_cost import break_even_density

    for tier in ("avx2", "avx512"):
        for pixels in (None, 16, 784):
            d = break_even_density(tier=tier, pixels=pixels)
            assert 0.0 < d < 4 / 9
            assert (estimated_speedup(d * 0.999, 0.0, tier, pixels) >= MARGIN
                    > estimated_speedup(d * 1.01, 0.0, tier, pixels))
        assert break_even_density(blocked=True, tier=tier) == pytest.approx(4 / 9)  # blocks gain at every density
    # AVX-512: a 4x4 output plane pays only at lower densities than a 28x28 one
    assert break_even_density(tier="avx512", pixels=16) < break_even_density(tier="avx512", pixels=784)


def test_the_allocation_spends_no_budget_above_a_pattern_layers_break_even():
    """A layer whose kernels all matter alike (the others' importance concentrated in a few) would keep a density its
    PatternConv cannot turn into speed;
    with the cap (pruning/layers.py gives every single-filter pattern layer one) the budget goes to the others."""
    import torch

    from ctprune.pruning.connectivity import allocate_kernels

    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 30)))
    scores = {f"l{i}": torch.rand(32, 32, generator=gen) ** (1 if i == 0 else 8) for i in range(4)}
    density = {}
    for caps in (None, {n: 0.15 for n in scores}):
        keep = allocate_kernels(scores, 8.0, allocation="importance", max_density=caps)
        density[caps is None] = {n: 4 * int(k.sum()) / (9 * k.numel()) for n, k in keep.items()}
        assert sum(int(k.sum()) for k in keep.values()) * 4 == pytest.approx(4 * 32 * 32 * 9 / 8.0, rel=0.02)
    assert density[True]["l0"] > 0.2  # uncapped, the important layer keeps more than it can use
    assert all(d <= 0.15 + 1e-3 for d in density[False].values()), density[False]


@pytest.mark.parametrize("fields, want", [
    ({"vendor_id": "AuthenticAMD", "cpu family": "25", "flags": "fpu avx2 fma avx512f avx512vl"}, "zen4"),
    ({"vendor_id": "AuthenticAMD", "cpu family": "25", "flags": "fpu avx2 fma"}, "zen3"),
    ({"vendor_id": "AuthenticAMD", "cpu family": "26", "flags": "fpu avx2 fma avx512f"}, "zen5"),
    ({"vendor_id": "AuthenticAMD", "cpu family": "23", "flags": "fpu avx2 fma"}, None),
    ({"vendor_id": "GenuineIntel", "cpu family": "6", "flags": "avx2 fma avx512f"}, None),
    ({"vendor_id": "AuthenticAMD", "cpu family": "?"}, None),
    ({}, None),
])
def test_the_core_generation_read_from_cpuinfo(monkeypatch, fields, want):
    import ctprune.runtime.cpu as cpu

    monkeypatch.setattr(cpu, "_cpuinfo", lambda: fields)
    assert cpu.cpu_model() == want


def test_for_this_cpu_picks_the_core_generations_entry_only_for_the_tier_that_runs(monkeypatch):
    import ctprune.runtime.cpu as cpu

    table = {"avx512": "tier", "avx512/zen4": "zen4"}
    monkeypatch.setattr(cpu, "kernel_tier", lambda: "avx512")
    monkeypatch.setattr(cpu, "cpu_model", lambda: "zen4")
    assert cpu.for_this_cpu(table) == "zen4" and cpu.for_this_cpu(table, "avx512") == "tier"
    monkeypatch.setattr(cpu, "cpu_model", lambda: "zen5")
    assert cpu.for_this_cpu(table) == "tier"
    monkeypatch.setattr(cpu, "kernel_tier", lambda: "avx2")
    assert cpu.for_this_cpu(table, default=1) == 1
    with pytest.raises(KeyError):
        cpu.for_this_cpu(table)
