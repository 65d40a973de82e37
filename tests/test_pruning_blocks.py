"""--block N: pattern layers pruned in blocks of N similar filters that share every kernel (same input channels, same
pattern per channel), stored next to each other in PatternConv's storage order. The clustering, the selection per
block, the plan's round trip, the written model (storage order, values), a ClickTrain run and its resume, and the
option's errors."""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ctprune
from ctprune.cli import run
from ctprune.errors import CtpruneError, GraphError
from ctprune.ops import pattern_layout
from ctprune.pruning import ClickTrainPruner, OneShotPruner, PruningPlan, one_shot_plan, select_plan
from ctprune.pruning.blocks import filter_blocks
from ctprune.pruning.importance import magnitude_importance
from ctprune.rewrite.pattern_conv import LayerPatterns, compact_from_dense
from tests.conftest import kernel_library_or_none, rel_err, run_ort
from tests.test_pruning_clicktrain import train

EXAMPLE_VGG = pathlib.Path(__file__).resolve().parent.parent / "examples" / "models" / "vgg_fmnist.onnx"
from tests.graph_nets import export

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


# ---- the clustering ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", [4, 8, 16])
def test_blocks_have_the_asked_sizes_and_are_deterministic(block):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    o = int(torch.randint(block + 1, 4 * block, (1,), generator=g))
    w = torch.randn(o, 7, 3, 3, generator=g)
    ids = filter_blocks(w, block)
    assert ids.shape == (o,) and ids.dtype == np.int64, seed
    sizes = np.bincount(ids)
    assert len(sizes) == math.ceil(o / block), seed
    assert (sizes[:-1] == block).all() and sizes[-1] == o - block * (len(sizes) - 1), (seed, sizes)
    np.testing.assert_array_equal(filter_blocks(w.clone(), block), ids, err_msg=str(seed))
    strongest = int(torch.argmax(w.square().sum((1, 2, 3))))
    assert ids[strongest] == 0, seed  # the first block is seeded by the strongest filter


@pytest.mark.parametrize("block", [4, 8, 16])
def test_filters_that_read_the_same_channels_alike_share_a_block(block):
    """Filters made as scaled copies of a few prototypes (per-kernel norms proportional within a group, each kernel
    in its own random direction) are clustered back into exactly their groups."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    groups, c = 3, 10
    o = groups * block
    amplitude = torch.rand(groups, c, generator=g) * torch.randint(0, 2, (groups, c), generator=g) + 0.05
    group_of = torch.randperm(o, generator=g) % groups
    direction = F.normalize(torch.randn(o, c, 9, generator=g), dim=-1)
    scale = torch.rand(o, generator=g) + 0.5
    w = (direction * amplitude[group_of][..., None] * scale[:, None, None]).reshape(o, c, 3, 3)
    ids = filter_blocks(w, block)
    for b in range(groups):
        assert len(set(group_of[torch.from_numpy(ids == b)].tolist())) == 1, (seed, ids, group_of)


# ---- the selection ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", [4, 8, 16])
def test_select_plan_chooses_one_row_per_block_from_summed_importance(block):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (block * 2 + 3, 40, 3, 3), "b": (block * 3, 64, 3, 3), "c": (block - 1, 24, 3, 3)}
    weights = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    blocks = {n: filter_blocks(w, block) for n, w in weights.items()}
    ratio = 7.0
    plan = select_plan(magnitude_importance(weights), shapes, ratio, patterns=6, importance_kind="magnitude",
                       blocks=blocks)
    totals = plan.totals()["conv_weights"]
    # the budget is met to within one group, as with single filters: the last group kept may cross it
    assert 0 <= totals["after"] - round(totals["before"] / ratio) < 4 * block, (seed, totals)
    assert plan.ratio_achieved == pytest.approx(ratio, rel=0.02), seed
    onehot = torch.zeros(9, len(plan.library))
    onehot.scatter_(0, torch.as_tensor(plan.library.patterns).T, 1.0)
    for n, layer in plan.layers.items():
        np.testing.assert_array_equal(layer.blocks, blocks[n])
        assert layer.block == min(block, shapes[n][0])
        imp = weights[n].reshape(shapes[n][0], shapes[n][1], 9).square()
        for b in np.unique(blocks[n]):
            rows = layer.assignment[blocks[n] == b]
            assert (rows == rows[0]).all(), (seed, n, b)
            assert (rows[0] >= 0).any(), (seed, n, b)  # no filter goes dead
            summed = imp[torch.from_numpy(blocks[n] == b)].sum(0) @ onehot  # (C, P) kept importance per pattern
            kept = rows[0] >= 0
            np.testing.assert_array_equal(rows[0][kept], summed.argmax(1).numpy()[kept], err_msg=f"{seed} {n} {b}")


def test_plan_blocks_survive_to_dict_and_from_dict():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    weights = {"a": torch.randn(20, 6, 3, 3, generator=g), "b": torch.randn(16, 20, 3, 3, generator=g)}
    blocks = {n: filter_blocks(w, 8) for n, w in weights.items()}
    plan = select_plan(magnitude_importance(weights), {n: tuple(w.shape) for n, w in weights.items()}, 5.0,
                       blocks=blocks)
    back = PruningPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    for n in weights:
        np.testing.assert_array_equal(back.layers[n].blocks, blocks[n])
        np.testing.assert_array_equal(back.layers[n].assignment, plan.layers[n].assignment)
        np.testing.assert_array_equal(back.layer_patterns()[n].blocks, blocks[n])
    assert back.layer_report() == plan.layer_report()
    assert all(row["block"] == 8 for row in back.layer_report())
    unblocked = select_plan(magnitude_importance(weights), {n: tuple(w.shape) for n, w in weights.items()}, 5.0)
    assert "blocks" not in json.dumps(unblocked.to_dict())  # N = 1 checkpoints are as before
    assert all(l.blocks is None for l in PruningPlan.from_dict(unblocked.to_dict()).layers.values())


# ---- the storage order ------------------------------------------------------------------------------------------------

def kernel_lists(filters, channels, patterns):
    """Storage order -> ([filters in stored order], {filter: [(channel, pattern), ...]})."""
    order, lists = [], {}
    for f, c, p in zip(filters, channels, patterns):
        f = int(f)
        if not order or order[-1] != f:
            assert f not in lists, f"filter {f} is not contiguous"
            order.append(f)
            lists[f] = []
        lists[f].append((int(c), int(p)))
    return order, lists


def check_blocks_stored_together(filters, channels, patterns, blocks):
    order, lists = kernel_lists(filters, channels, patterns)
    counts = [len(lists[f]) for f in order]
    assert counts == sorted(counts, reverse=True)
    position = {f: i for i, f in enumerate(order)}
    for b in np.unique(blocks):
        members = np.nonzero(blocks == b)[0]
        places = sorted(position[int(f)] for f in members)
        assert places == list(range(places[0], places[0] + len(members))), f"block {b} is not adjacent"
        assert all(lists[int(f)] == lists[int(members[0])] for f in members), f"block {b}: kernel lists differ"


def test_compact_order_with_blocks_keeps_blocks_adjacent_and_one_filter_blocks_change_nothing():
    rng = np.random.default_rng()
    o, c = 24, 10
    blocks = rng.permutation(np.repeat(np.arange(6), 4))
    block_rows = rng.integers(-1, 3, (6, c))
    block_rows[:, 0] = rng.integers(0, 3, 6)  # every filter keeps a kernel
    assignment = block_rows[blocks]
    library = np.array([[0, 1, 3, 4], [1, 3, 4, 5], [4, 5, 7, 8]])
    mask = LayerPatterns(library, assignment).mask()
    weight = (rng.standard_normal((o, c, 3, 3)) * mask).astype(np.float32)
    compact = compact_from_dense(weight, LayerPatterns(library, assignment, blocks))
    check_blocks_stored_together(compact.kernel_filters, compact.kernel_channels, compact.kernel_patterns, blocks)
    plain = compact_from_dense(weight, LayerPatterns(library, assignment))
    alone = compact_from_dense(weight, LayerPatterns(library, assignment, np.arange(o)))
    np.testing.assert_array_equal(alone.weights, plain.weights)
    assert alone.attributes() == plain.attributes()
    with pytest.raises(GraphError, match="blocks"):
        compact_from_dense(weight, LayerPatterns(library, assignment, np.arange(o - 1)))


# ---- whole runs -------------------------------------------------------------------------------------------------------

class UnevenNet(nn.Module):
    """3x3 Convs whose filter counts are not multiples of 16 (the last block is smaller), a 1x1 Conv and an FC."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 12, 3, padding=1)
        self.c1 = nn.Conv2d(12, 20, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(20)
        self.c2 = nn.Conv2d(20, 36, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(36, 40, 3, padding=1)
        self.c4 = nn.Conv2d(40, 24, 1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.c1(F.relu(self.c0(x)))))
        x = F.relu(self.c4(F.relu(self.c3(F.relu(self.c2(x))))))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    root = tmp_path_factory.mktemp("block_nets")
    onnx.save(export("resnet", "torchscript17", size=16, seed=fresh_seed() % 1000), root / "resnet.onnx")
    torch.manual_seed(fresh_seed())
    net = UnevenNet().eval()
    with torch.no_grad():
        net.bn1.running_mean.uniform_(-0.2, 0.2)
        net.bn1.running_var.uniform_(0.5, 1.5)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    (root / "uneven.onnx").write_bytes(buf.getvalue())
    return root


def prune_keeping_plan(monkeypatch, path, **options):
    """ctprune.prune, with the pruner's final plan kept (prune_now is the --epochs 0 path)."""
    plans = []
    prune_now = ClickTrainPruner.prune_now

    def keep(self):
        plans.append(prune_now(self))
        return plans[-1]

    monkeypatch.setattr(ClickTrainPruner, "prune_now", keep)
    result = ctprune.prune(str(path), quiet=True, **options)
    return result, plans[-1]


def check_written_model(result, plan, block, x):
    nodes = {n.name: n for n in result.model.graph.node if n.op_type == "PatternConv"}
    # a layer whose PatternConv would not be faster stays a dense Conv (rewrite/pattern_cost.py): blocks of 4 and 8
    # run filter by filter in the kernel, so a dense enough layer of theirs stays dense
    kept = {r["name"]: r["note"] for r in result.report["layers"] if r["form"] == "dense-kept" and r["name"] in plan.layers}
    assert plan.layers and set(nodes) | set(kept) == set(plan.layers) and not set(nodes) & set(kept), kept
    assert all("PatternConv would not be" in why and "kept dense" in why for why in kept.values()), kept
    for name, layer in plan.layers.items():
        o = layer.weight_shape[0]
        sizes = np.bincount(layer.blocks)
        assert len(sizes) == math.ceil(o / block) and sizes.max() == min(block, o), name
        for b in range(len(sizes)):
            rows = layer.assignment[layer.blocks == b]
            assert (rows == rows[0]).all(), (name, b)
        if name in kept:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[name].attribute}
        check_blocks_stored_together(*pattern_layout.decode(attrs), layer.blocks)
    rows = [r for r in result.report["layers"] if r["name"] in plan.layers]  # as PatternConv or kept dense
    assert rows and all(r["block"] == block for r in rows) and result.report["block"] == block
    want = run_ort(result.masked_dense, x)[0]
    assert rel_err(run_ort(result.model, x)[0], want) < 1e-4  # through the model-local functions
    if kernel_library_or_none() is not None:
        sess = ctprune.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
        assert rel_err(sess.run(None, {sess.get_inputs()[0].name: x})[0], want) < 1e-4  # through the kernels


@pytest.mark.parametrize("block", [4, 8, 16])
@pytest.mark.parametrize("net, method", [("resnet", "pattern"), ("uneven", "auto")])
def test_epochs0_run_is_block_structured_and_equals_the_masked_dense_model(nets, monkeypatch, block, net, method):
    seed = fresh_seed() % 10_000
    result, plan = prune_keeping_plan(monkeypatch, nets / f"{net}.onnx", ratio=6, epochs=0, method=method,
                                      block=block, seed=seed)
    assert result.report["ratio_achieved"] == pytest.approx(6.0, rel=0.02), seed
    x = np.random.default_rng().standard_normal((2, 3, 16, 16)).astype(np.float32)
    check_written_model(result, plan, block, x)


def test_both_carries_the_block_into_its_pattern_stage(nets, monkeypatch):
    result, plan = prune_keeping_plan(monkeypatch, nets / "resnet.onnx", ratio=8, epochs=0, method="both", block=4,
                                      seed=fresh_seed() % 10_000)
    x = np.random.default_rng().standard_normal((2, 3, 16, 16)).astype(np.float32)
    check_written_model(result, plan, 4, x)


def test_fine_tuned_run_is_block_structured(nets, monkeypatch):
    plans = []
    final_plan = ClickTrainPruner.final_plan

    def keep(self):
        plans.append(final_plan(self))
        return plans[-1]

    monkeypatch.setattr(ClickTrainPruner, "final_plan", keep)
    result = ctprune.prune(str(nets / "uneven.onnx"), ratio=6, epochs=1, batch_size=32, block=16, quiet=True,
                           seed=fresh_seed() % 10_000)
    assert result.report["ratio_achieved"] == pytest.approx(6.0, rel=0.02)
    x = np.random.default_rng().standard_normal((2, 3, 16, 16)).astype(np.float32)
    check_written_model(result, plans[-1], 16, x)


@pytest.mark.parametrize("method", ["pattern", "auto"])
def test_block_1_is_byte_identical_to_no_option(nets, method):
    seed = fresh_seed() % 10_000
    plain = ctprune.prune(str(nets / "resnet.onnx"), ratio=7, epochs=0, method=method, seed=seed, quiet=True)
    one = ctprune.prune(str(nets / "resnet.onnx"), ratio=7, epochs=0, method=method, seed=seed, quiet=True, block=1)
    assert one.model.SerializeToString() == plain.model.SerializeToString()
    assert one.report["layers"] == plain.report["layers"] and "block" not in one.report
    assert all("block" not in r for r in one.report["layers"] if r["form"] == "pattern")


@pytest.mark.parametrize("bad", [3, 0, 32, "4", True, 4.0])
def test_bad_block_is_one_clear_error(nets, tmp_path, capsys, bad):
    with pytest.raises(CtpruneError, match=r"block .* is not one of 1, 4, 8, 16"):
        ctprune.prune(str(nets / "resnet.onnx"), ratio=8, epochs=0, block=bad)
    if isinstance(bad, int) and not isinstance(bad, bool):
        out = tmp_path / "out.onnx"
        code = run([str(nets / "resnet.onnx"), "--ratio", "8x", "--epochs", "0", "--block", str(bad), "-o", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and "--block" in err and f"'{bad}' is not one of" in err and "Traceback" not in err
        assert not out.exists()


def test_block_is_a_setting_a_resumed_run_must_repeat():
    from ctprune.options import PruneOptions

    assert PruneOptions(block=8).setting_values()["block"] == 8
    assert PruneOptions().block == 1


# ---- ClickTrain training --------------------------------------------------------------------------------------------

class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 40, 3, padding=1, stride=2)
        self.fc = nn.Linear(40, 5)

    def forward(self, x):
        x = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
        return self.fc(x.mean(dim=(2, 3)))

    def prunable(self):
        return {"c2": self.c2.weight, "c3": self.c3.weight}


def make_batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def fresh(seed, block):
    torch.manual_seed(seed)
    net = SmallNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    return net, opt, ClickTrainPruner(net.prunable(), ratio=6.0, patterns=6, block=block)


def test_clicktrain_run_with_block_16_ends_block_structured():
    seed = fresh_seed()
    net, opt, pruner = fresh(seed, 16)
    batches = make_batches(40, seed)
    pruner.begin(40, 10)
    train(net, opt, pruner, batches, range(40))
    first = {n: b.copy() for n, b in pruner._filter_blocks.items()}
    assert pruner.hard and pruner.selections >= 3, seed
    plan = pruner.final_plan()
    assert plan.ratio_achieved == pytest.approx(6.0, rel=0.02), seed
    for name, w in net.prunable().items():
        layer = plan.layers[name]
        np.testing.assert_array_equal(layer.blocks, first[name])  # the same blocks from first selection to last
        assert np.bincount(layer.blocks).max() == 16
        assert torch.equal(w.detach() != 0, plan.layer_mask(name).bool()), seed
        for b in np.unique(layer.blocks):
            rows = layer.assignment[layer.blocks == b]
            assert (rows == rows[0]).all(), (seed, name, b)
        compact = compact_from_dense(w.detach().numpy(), plan.layer_patterns()[name], where=name)
        check_blocks_stored_together(compact.kernel_filters, compact.kernel_channels, compact.kernel_patterns,
                                     layer.blocks)


def test_one_shot_baseline_prunes_in_blocks():
    seed = fresh_seed()
    net, opt, _ = fresh(seed, 8)
    pruner = OneShotPruner(net.prunable(), ratio=6.0, patterns=6, block=8)
    pruner.begin(10)
    train(net, opt, pruner, make_batches(10, seed), range(10))
    plan = pruner.final_plan()
    for name, w in net.prunable().items():
        layer = plan.layers[name]
        assert np.bincount(layer.blocks).max() == 8
        for b in np.unique(layer.blocks):
            rows = layer.assignment[layer.blocks == b]
            assert (rows == rows[0]).all(), (seed, name, b)
        assert torch.equal(w.detach() != 0, plan.layer_mask(name).bool()), seed
    weights = {n: w.detach().clone() for n, w in SmallNet().prunable().items()}
    expected = {n: filter_blocks(w, 8) for n, w in weights.items()}  # from the weights before they are masked
    direct = one_shot_plan(weights, 6.0, patterns=6, block=8)
    for name, layer in direct.layers.items():
        np.testing.assert_array_equal(layer.blocks, expected[name])
        assert all((layer.assignment[layer.blocks == b] == layer.assignment[layer.blocks == b][0]).all()
                   for b in np.unique(layer.blocks))


def test_blocks_are_chosen_once_and_a_resumed_run_keeps_them():
    seed = fresh_seed()
    batches = make_batches(40, seed)
    net_a, opt_a, pr_a = fresh(seed, 4)
    pr_a.begin(40, 10)
    train(net_a, opt_a, pr_a, batches, range(40))

    net_b, opt_b, pr_b = fresh(seed, 4)
    pr_b.begin(40, 10)
    train(net_b, opt_b, pr_b, batches, range(13))  # mid soft phase: selections made, more to come
    chosen = {n: b.copy() for n, b in pr_b._filter_blocks.items()}
    buf = io.BytesIO()
    torch.save({"net": net_b.state_dict(), "opt": opt_b.state_dict(), "pruner": pr_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)

    net_c, opt_c, pr_c = fresh(seed + 1, 4)
    net_c.load_state_dict(ckpt["net"])
    opt_c.load_state_dict(ckpt["opt"])
    pr_c.load_state_dict(ckpt["pruner"])
    pr_c.begin(40, 10)
    for n in chosen:
        np.testing.assert_array_equal(pr_c._filter_blocks[n], chosen[n])
    train(net_c, opt_c, pr_c, batches, range(13, 40))
    assert pr_c.final_plan().to_dict() == pr_a.final_plan().to_dict(), seed
    for (name, a), c in zip(net_a.state_dict().items(), net_c.state_dict().values()):
        assert torch.equal(a, c), (seed, name)
    other = ClickTrainPruner(SmallNet().prunable(), ratio=6.0, patterns=6, block=8)
    with pytest.raises(ValueError, match="blocks of 4"):
        other.load_state_dict(ckpt["pruner"])


def test_blocks_do_not_shift_the_budget_between_layer_kinds(monkeypatch):
    """A blocked pattern layer is valued per weight as its single filters would be (LayerGroups.value_scale): with
    --block 16 the example VGG's 3x3 layers and its FC layer keep about what they keep per filter (without the
    scale the 3x3 layers lost sqrt(16) = 4x in value and the FC layer kept far more). The single-filter speed cap
    (pattern_cost.break_even_density, which blocked layers do not get) is lifted here: it moves budget on purpose."""
    import ctprune.pruning.layers as layers

    monkeypatch.setattr(layers, "_pattern_break_even", lambda layer: 4 / 9)

    def split(block):
        result = ctprune.prune(str(EXAMPLE_VGG), ratio=8, epochs=0, block=block, quiet=True, seed=0)
        rows = result.report["layers"]
        conv = sum(r["weights_after"] for r in rows if r["form"] != "sparse")
        fc = sum(r["weights_after"] for r in rows if r["form"] == "sparse")
        return conv, fc

    (conv1, fc1), (conv16, fc16) = split(1), split(16)
    assert 0.7 < conv16 / conv1 < 1.4 and 0.7 < fc16 / fc1 < 1.4, (conv1, fc1, conv16, fc16)
