"""ClickTrainPruner as training hooks: schedule, group lasso, hard masks, resume, --epochs 0, the one-shot baseline."""

import copy
import io
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ctprune.errors import GraphError, RatioError
from ctprune.pruning import ClickTrainPruner, OneShotPruner, PruningSchedule, one_shot_plan, prunable_convs


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 24, 3, padding=1)
        self.c3 = torch.nn.Conv2d(24, 32, 3, padding=1, stride=2)
        self.fc = torch.nn.Linear(32, 5)

    def forward(self, x):
        x = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
        return self.fc(x.mean(dim=(2, 3)))

    def prunable(self):
        return {"c2": self.c2.weight, "c3": self.c3.weight}


def make_batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def train(net, opt, pruner, batches, steps):
    for step in steps:
        x, y = batches[step]
        loss = F.cross_entropy(net(x), y)
        extra = pruner.extra_loss(step)
        if extra is not None:
            loss = loss + extra
        opt.zero_grad()
        loss.backward()
        pruner.after_backward(step)
        opt.step()
        pruner.after_step(step)


def fresh(seed=0, **knobs):
    torch.manual_seed(seed)
    net = SmallNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    # long phases: room to stop mid-phase in 40 steps; gradient importance and the lasso penalty unless asked otherwise
    knobs = {"warmup": 0.1, "soft": 0.4, "importance": "gradient", "soft_mode": "lasso", "lasso": "penalty", **knobs}
    return net, opt, ClickTrainPruner(net.prunable(), ratio=6.0, patterns=6, **knobs)


def test_schedule_defaults_and_phases():
    default = PruningSchedule.from_run(200)  # no warm-up (magnitude needs none), 20% soft, 80% hard
    assert (default.warmup_end, default.hard_start) == (1, 40)
    s = PruningSchedule.from_run(200, warmup=0.05, soft=0.25)
    assert (s.warmup_end, s.hard_start, s.reselect_every) == (10, 60, 6)
    assert [s.phase(i) for i in (0, 9, 10, 59, 60, 199)] == ["warmup"] * 2 + ["soft"] * 2 + ["hard"] * 2
    assert [i for i in range(200) if s.selects_after(i)] == [9, 15, 21, 27, 33, 39, 45, 51, 57]
    assert s.lasso_lambda == pytest.approx(2e-4 * 100)  # scale capped at 100x for a 50-step soft phase
    long = PruningSchedule.from_run(200_000, warmup=0.1, soft=0.4)
    assert long.lasso_lambda == pytest.approx(2e-4)  # the paper's lambda over a paper-length soft phase
    one = PruningSchedule.from_run(1)
    assert (one.warmup_end, one.hard_start) == (1, 1)
    with pytest.raises(ValueError):
        PruningSchedule.from_run(0)
    with pytest.raises(ValueError):
        PruningSchedule.from_run(10, warmup=0.6, soft=0.6)


def test_training_goes_warmup_soft_hard_and_meets_the_ratio():
    net, opt, pruner = fresh()
    batches = make_batches(40)
    pruner.begin(40, 10)
    train(net, opt, pruner, batches, range(3))
    assert pruner.plan is None and pruner.meter.batches == 3
    train(net, opt, pruner, batches, range(3, 19))
    assert pruner.plan is not None and not pruner.hard
    assert pruner.selections >= 3  # the first selection and re-selections in the soft phase
    assert pruner.extra_loss(10) is not None
    train(net, opt, pruner, batches, range(19, 40))
    assert pruner.hard and pruner.extra_loss(30) is None
    plan = pruner.final_plan()
    assert plan.importance == "gradient"
    assert plan.ratio_achieved == pytest.approx(6.0, rel=0.01)
    for name, w in net.prunable().items():
        assert torch.equal(w.detach() != 0, plan.layer_mask(name).bool())


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_hard_masks_keep_zeros_after_optimizer_steps(optimizer):
    net, _, pruner = fresh(lasso_lambda=0.0)
    opt = (
        torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        if optimizer == "sgd"
        else torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=1e-2)
    )
    batches = make_batches(30, seed=1)
    pruner.begin(30, 10)
    train(net, opt, pruner, batches, range(15))  # hard masks from step 15 on
    masks = {n: pruner.plan.layer_mask(n) for n in net.prunable()}
    before = {n: w.detach().clone() for n, w in net.prunable().items()}
    train(net, opt, pruner, batches, range(15, 30))  # momentum keeps pushing pruned weights; masks must win
    for name, w in net.prunable().items():
        assert torch.all(w.detach()[masks[name] == 0] == 0)
        assert not torch.equal(w.detach(), before[name])  # kept weights still train


def test_group_lasso_value_and_gradient_match_a_direct_computation():
    torch.manual_seed(3)
    w = torch.nn.Parameter(torch.randn(4, 3, 3, 3, dtype=torch.float64))
    pruner = ClickTrainPruner({"l": w}, ratio=3.0, patterns=2, warmup=0.1, soft=0.8, lasso_lambda=0.37, lasso="penalty",
                              soft_mode="lasso")
    pruner.begin(10)
    pruner.after_step(0)  # first selection (by magnitude: no gradient yet); soft phase begins
    assert pruner.plan is not None and not pruner.hard
    with torch.no_grad():  # one kept kernel with its dropped taps already at zero: its gradient must be 0, not NaN
        kept = [(o, c) for o in range(4) for c in range(3) if pruner.plan.layers["l"].assignment[o, c] >= 0][0]
        w[kept] *= pruner.plan.layer_mask("l")[kept]
    mask = pruner.plan.layer_mask("l", dtype=torch.float64)
    value = pruner.extra_loss(1)
    value.backward()

    expected_value = 0.0
    expected_grad = torch.zeros_like(w)
    for o in range(4):
        for c in range(3):
            dropped = mask[o, c] == 0  # kept kernel: its 5 dropped taps; removed kernel: all 9
            norm = w.detach()[o, c][dropped].norm()
            expected_value += 0.37 * norm.item()
            if norm > 0:
                expected_grad[o, c][dropped] = 0.37 * w.detach()[o, c][dropped] / norm
    assert value.item() == pytest.approx(expected_value, rel=1e-12)
    assert torch.allclose(w.grad, expected_grad, rtol=1e-12, atol=0)
    # the importance meter removes exactly this gradient: with no task loss, importance stays zero
    assert torch.allclose(pruner._lasso_gradient()["l"], expected_grad, rtol=1e-12, atol=1e-300)
    pruner.after_backward(1)
    assert pruner.meter.importance()["l"].abs().max().item() < 1e-12


# stop mid soft phase (between re-selections) or in the hard phase; the loop may call begin() before or after loading
@pytest.mark.parametrize("stop, begin_after_load, lasso", [(13, True, "penalty"), (27, False, "penalty"),
                                                           (13, False, "proximal")])
def test_resume_continues_exactly(stop, begin_after_load, lasso):
    batches = make_batches(40, seed=2)
    net_a, opt_a, pr_a = fresh(seed=5, lasso=lasso)
    pr_a.begin(40, 10)
    train(net_a, opt_a, pr_a, batches, range(40))

    net_b, opt_b, pr_b = fresh(seed=5, lasso=lasso)
    pr_b.begin(40, 10)
    train(net_b, opt_b, pr_b, batches, range(stop))
    buf = io.BytesIO()
    torch.save({"net": net_b.state_dict(), "opt": opt_b.state_dict(), "pruner": pr_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)

    net_c, opt_c, pr_c = fresh(seed=99, lasso=lasso)  # different init: everything must come from the checkpoint
    net_c.load_state_dict(ckpt["net"])
    opt_c.load_state_dict(ckpt["opt"])
    if not begin_after_load:
        pr_c.begin(40, 10)
    pr_c.load_state_dict(ckpt["pruner"])
    if begin_after_load:
        pr_c.begin(40, 10)
    train(net_c, opt_c, pr_c, batches, range(stop, 40))

    assert pr_c.final_plan().to_dict() == pr_a.final_plan().to_dict()
    for (name, a), c in zip(net_a.state_dict().items(), net_c.state_dict().values()):
        assert torch.equal(a, c), name


def test_resume_refuses_a_different_ratio():
    _, _, pr = fresh()
    pr.begin(10)
    state = copy.deepcopy(pr.state_dict())
    other = ClickTrainPruner(SmallNet().prunable(), ratio=4.0, patterns=6)
    with pytest.raises(ValueError, match="4.0x"):
        other.load_state_dict(state)


def test_prune_now_without_gradients_uses_magnitude():
    net, _, pruner = fresh()
    plan = pruner.prune_now()
    assert plan.importance == "magnitude" and pruner.hard
    assert plan.ratio_achieved == pytest.approx(6.0, rel=0.01)
    for name, w in net.prunable().items():
        assert int((w != 0).sum()) == plan.layers[name].weights_after


def test_calibrate_then_prune_now_uses_gradients():
    net, _, pruner = fresh()
    batches = make_batches(3, seed=4)
    used = pruner.calibrate(lambda b: F.cross_entropy(net(b[0]), b[1]), batches)
    assert used == 3 and pruner.meter.batches == 3
    assert all(w.grad is None for w in net.prunable().values())
    plan = pruner.prune_now()
    assert plan.importance == "gradient" and plan.ratio_achieved == pytest.approx(6.0, rel=0.01)


def test_one_shot_pruner_masks_from_the_first_step():
    torch.manual_seed(0)
    net = SmallNet()
    dense = {n: w.detach().clone() for n, w in net.prunable().items()}
    pruner = OneShotPruner(net.prunable(), ratio=6.0, patterns=6)
    pruner.begin(10)
    assert pruner.hard and pruner.plan.importance == "magnitude"
    # magnitude: in each layer, every kept weight outweighs the dropped taps of its own kernel
    for name, w in net.prunable().items():
        mask = pruner.plan.layer_mask(name)
        assert torch.equal(w.detach(), dense[name] * mask)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    train(net, opt, pruner, make_batches(10), range(10))
    for name, w in net.prunable().items():
        assert torch.all(w.detach()[pruner.plan.layer_mask(name) == 0] == 0)


def test_bad_inputs_raise_user_errors():
    net = SmallNet()
    with pytest.raises(RatioError, match="largest reachable"):
        ClickTrainPruner(net.prunable(), ratio=100.0)
    with pytest.raises(RatioError, match="greater than 1"):
        ClickTrainPruner(net.prunable(), ratio=0.5)
    with pytest.raises(GraphError, match="no prunable Conv"):
        ClickTrainPruner({}, ratio=8.0)
    with pytest.raises(GraphError, match="'fc'"):
        ClickTrainPruner({"fc": net.fc.weight}, ratio=8.0)


def test_prunable_convs_skips_first_and_unsupported_convs():
    def conv(name, k=(3, 3), group=1, dil=(1, 1), weight=None, macs=1000):
        return SimpleNamespace(node_name=name, weight_name=weight or name + ".w", kernel_shape=k, group=group, dilations=dil, macs=macs)

    layers = [conv("stem"), conv("a"), conv("pw", k=(1, 1)), conv("dw", group=8), conv("dil", dil=(2, 2)),
              conv("s1", weight="shared"), conv("s2", weight="shared"), conv("b")]
    params = {l.weight_name: torch.nn.Parameter(torch.zeros(1)) for l in layers}
    weights, skipped, macs = prunable_convs(layers, params)
    assert list(weights) == ["a", "b"] and weights["a"] is params["a.w"]
    assert set(skipped) == {"stem", "pw", "dw", "dil", "s1", "s2"}
    assert "first Conv" in skipped["stem"] and "1x1" in skipped["pw"] and "shared" in skipped["s1"]
    assert macs == {"a": 1000, "b": 1000}
    weights, skipped, _ = prunable_convs(layers, params, keep_first_dense=False)
    assert "stem" in weights and "stem" not in skipped


def test_all_zero_gradients_fall_back_to_magnitude():
    net, _, pruner = fresh()
    reference = one_shot_plan({n: w.detach().clone() for n, w in net.prunable().items()}, ratio=6.0, patterns=6)
    # a loss at its optimum (distilling a student equal to its teacher) has zero gradient everywhere
    used = pruner.calibrate(lambda b: (net(b[0]) * 0.0).sum(), make_batches(2))
    assert used == 2
    plan = pruner.prune_now()
    assert plan.importance == "magnitude"
    assert plan.to_dict() == reference.to_dict()


def test_pruner_is_a_train_hooks():
    from ctprune.train.hooks import TrainHooks

    assert isinstance(fresh()[2], TrainHooks)


def test_lasso_mode_selects_by_magnitude_first_then_shrinks_pruned_groups_to_zero():
    # soft_mode="lasso": first selection by magnitude after the first step (the one-shot baseline's plan, since the
    # weights have not moved: lr 0), then proximal group-lasso steps that take each to-be-pruned group's norm down by
    # its layer's step: the median group is exactly zero when the hard masks come on, the kept taps never move.
    torch.manual_seed(4)
    net = SmallNet()
    dense = {n: w.detach().clone() for n, w in net.prunable().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    pruner = ClickTrainPruner(net.prunable(), ratio=6.0, patterns=6, soft_mode="lasso")
    pruner.begin(50, 10)
    s = pruner.schedule
    assert (s.warmup_end, s.hard_start) == (1, 10)
    batches = make_batches(50)
    train(net, opt, pruner, batches, range(1))
    reference = one_shot_plan(dict(dense), ratio=6.0, patterns=6, apply=False)
    assert pruner.plan.importance == "magnitude" and pruner.plan.to_dict() == reference.to_dict()
    assert pruner.meter.batches == 0  # magnitude needs no gradient statistics
    train(net, opt, pruner, batches, range(1, s.hard_start - 1))  # the soft phase but its last step
    soft_steps = s.hard_start - s.warmup_end
    for name, w in net.prunable().items():
        keep = reference.layer_mask(name).reshape(w.shape[0], w.shape[1], 9)
        before = dense[name].reshape(keep.shape)
        after = w.detach().reshape(keep.shape)
        assert torch.equal(after * keep, before * keep)
        norms = torch.linalg.vector_norm(before * (1 - keep), dim=-1)
        step = float(norms[norms > 0].median()) / soft_steps
        shrunk = (norms - step * (soft_steps - 1)).clamp_min(0)  # one soft step still to come
        expected = before * (1 - keep) * (shrunk / norms.clamp_min(1e-30)).unsqueeze(-1)
        assert torch.allclose(after * (1 - keep), expected, atol=1e-6)
    train(net, opt, pruner, batches, range(s.hard_start - 1, 50))
    assert pruner.hard  # the masks held: shrinking only what they remove leaves magnitude choosing the same weights
    for name in net.prunable():
        assert torch.equal(pruner.final_plan().layer_mask(name), reference.layer_mask(name))


@pytest.mark.parametrize("regrow", [True, False])
def test_default_gradual_soft_phase_ramps_the_ratio_and_zeroes_what_it_removes(regrow):
    # The default: the soft phase (40% of the steps) selects by magnitude at a ratio that rises from patterns alone
    # (2.25x, every kernel kept) to the target on a cubic; each selection zeroes the weights it removes, which train
    # back until the next selection (regrow) or stay zero; the final selection meets the target and holds.
    torch.manual_seed(6)
    net = SmallNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    pruner = ClickTrainPruner(net.prunable(), ratio=6.0, patterns=6, regrow=regrow)
    total = 60
    pruner.begin(total, 10)
    s = pruner.schedule
    assert (s.warmup_end, s.hard_start) == (1, 24)
    assert pruner.extra_loss(5) is None  # no lasso term in this mode
    batches = make_batches(total, seed=2)
    ratios, kept_before, regrew = [], None, False
    for step in range(s.hard_start - 1):
        train(net, opt, pruner, batches, [step])
        if s.selects_after(step):
            plan = pruner.plan
            ratios.append(plan.ratio_achieved)
            assert plan.ratio_target == pytest.approx(pruner._ramp_ratio(step))
            for name, w in net.prunable().items():  # zeroed at the selection
                assert torch.all(w.detach()[plan.layer_mask(name) == 0] == 0)
            kept_before = {n: plan.layer_mask(n) for n in net.prunable()}
        elif kept_before is not None:
            removed_nonzero = any(torch.any(w.detach()[kept_before[n] == 0] != 0) for n, w in net.prunable().items())
            regrew = regrew or removed_nonzero
            assert regrow or not removed_nonzero
    assert ratios[0] == pytest.approx(2.25)
    assert all(b >= a - 1e-9 for a, b in zip(ratios, ratios[1:])) and ratios[-1] <= 6.0 * (1 + 1e-6)
    assert 2.25 < ratios[len(ratios) // 2] < 6.0  # a ramp, not a jump
    assert regrew == regrow  # removed weights trained back between selections, or stayed zero
    train(net, opt, pruner, batches, range(s.hard_start - 1, total))
    assert pruner.hard and pruner.final_plan().ratio_achieved == pytest.approx(6.0, rel=0.05)
    for name, w in net.prunable().items():
        assert torch.all(w.detach()[pruner.plan.layer_mask(name) == 0] == 0)
    with pytest.raises(ValueError, match="soft_mode"):
        ClickTrainPruner(net.prunable(), ratio=6.0, soft_mode="ramp")


@pytest.mark.parametrize("kind", ["gradient", "blend"])
def test_gradient_and_blend_importance_choose_from_the_meter(kind):
    net, _, pruner = fresh(importance=kind)
    pruner.calibrate(lambda b: F.cross_entropy(net(b[0]), b[1]), make_batches(3))
    importance, used = pruner._importance()
    assert used == kind
    grad = pruner.meter.importance()
    for name, w in net.prunable().items():
        magnitude = w.detach().square().reshape(grad[name].shape)
        expected = grad[name] if kind == "gradient" else grad[name] / grad[name].mean() + magnitude / magnitude.mean()
        assert torch.allclose(importance[name], expected)
    with pytest.raises(ValueError, match="importance"):
        ClickTrainPruner(net.prunable(), ratio=6.0, importance="taylor")
