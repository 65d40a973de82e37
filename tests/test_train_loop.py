"""fine_tune: it learns, calls hooks in order, checkpoints, resumes to the same weights, and says why a backend
or device cannot be used."""

import copy
import os
import signal
import sys

import numpy as np
import pytest
import torch
from torch import nn

from ctprune.errors import BackendError, DataError
from ctprune.train import Dataset, TrainHooks, evaluate, fine_tune, synthetic_data
from ctprune.train.checkpoint import CheckpointError, checkpoint_path, load_checkpoint
from ctprune.train.distill import as_logits, distillation_loss


def tiny_net(seed: int, softmax: bool = False, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
              nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(dropout), nn.Linear(24, 4)]
    if softmax:
        layers.append(nn.Softmax(1))
    with torch.no_grad():
        layers[7].weight.mul_(8.0)  # confident outputs, so distillation has something to match
    return nn.Sequential(*layers)


def labelled(teacher: nn.Module, n: int = 128, seed: int = 1) -> Dataset:
    data = synthetic_data((None, 1, 8, 8), n, seed)
    with torch.no_grad():
        data.y = teacher(torch.from_numpy(data.x)).argmax(1).numpy()
    return data


def kd_loss(student, teacher, data, softmax=False) -> float:
    x = torch.from_numpy(data.x)
    with torch.no_grad():
        return distillation_loss(as_logits(student.eval()(x), softmax), as_logits(teacher.eval()(x), softmax),
                                 4.0).item()


def test_fine_tune_learns_the_teacher():
    teacher, student = tiny_net(0), tiny_net(1)
    data = labelled(teacher)
    before, agree_before = kd_loss(student, teacher, data), evaluate(student, data, agreement_with=teacher)
    result = fine_tune(student, teacher, train=data, eval=data, epochs=4, batch_size=16, lr=0.05, quiet=True)
    after = kd_loss(student, teacher, data)
    assert after < 0.5 * before
    assert result.agreement > agree_before["agreement"] + 0.2
    assert result.accuracy == result.agreement  # labels are the teacher's predictions
    assert len(result.history) == 4 and result.steps == 32 and result.device == "cpu"
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert not student.training


def test_distils_without_labels_and_from_softmax_outputs():
    teacher, student = tiny_net(0, softmax=True), tiny_net(1, softmax=True)
    data = synthetic_data((None, 1, 8, 8), 128, seed=2)
    before = kd_loss(student, teacher, data, softmax=True)
    result = fine_tune(student, teacher, train=data, eval=data, epochs=3, batch_size=16, lr=0.05, quiet=True)
    assert kd_loss(student, teacher, data, softmax=True) < 0.6 * before
    assert result.accuracy is None and result.agreement is not None
    assert "train_agreement" in result.history[0]


def test_evaluate_counts_by_hand():
    teacher, student = tiny_net(0), tiny_net(1)
    data = labelled(teacher, n=50)
    data.y[:10] = (data.y[:10] + 1) % 4
    x = torch.from_numpy(data.x)
    with torch.no_grad():
        pred, ref = student(x).argmax(1).numpy(), teacher(x).argmax(1).numpy()
    got = evaluate(student, data, batch_size=7, agreement_with=teacher)
    assert got["accuracy"] == pytest.approx(np.mean(pred == data.y))
    assert got["agreement"] == pytest.approx(np.mean(pred == ref))
    assert evaluate(student, data, agreement_with=torch.from_numpy(ref))["agreement"] == got["agreement"]


class RecordingHooks(TrainHooks):
    def __init__(self, model=None):
        self.events, self.model, self.grads_seen = [], model, 0

    def begin(self, total_steps, steps_per_epoch):
        self.events.append(("begin", total_steps, steps_per_epoch))

    def extra_loss(self, step):
        self.events.append(("extra_loss", step))

    def after_backward(self, step):
        self.events.append(("after_backward", step))
        if self.model is not None and all(p.grad is not None for p in self.model.parameters()):
            self.grads_seen += 1

    def after_step(self, step):
        self.events.append(("after_step", step))

    def end_epoch(self, epoch):
        self.events.append(("end_epoch", epoch))

    def state_dict(self):
        return {"events": list(self.events)}

    def load_state_dict(self, state):
        self.events = list(state["events"])


def test_hooks_called_in_order_with_step_numbers():
    teacher, student = tiny_net(0), tiny_net(1)
    hooks = RecordingHooks(student)
    fine_tune(student, teacher, train=labelled(teacher, n=40), epochs=2, batch_size=10, hooks=hooks, quiet=True)
    expected = [("begin", 8, 4)]
    for epoch in range(2):
        for step in range(epoch * 4, epoch * 4 + 4):
            expected += [("extra_loss", step), ("after_backward", step), ("after_step", step)]
        expected.append(("end_epoch", epoch))
    assert hooks.events == expected
    assert hooks.grads_seen == 8


def test_extra_loss_is_trained_on():
    class ShrinkFirstConv(TrainHooks):
        def __init__(self, model):
            self.weight = model[0].weight

        def extra_loss(self, step):
            return 10.0 * self.weight.pow(2).sum()

    teacher = tiny_net(0)
    data = labelled(teacher, n=64)
    plain, shrunk = tiny_net(1), tiny_net(1)
    fine_tune(plain, teacher, train=data, epochs=1, batch_size=16, lr=0.02, quiet=True)
    fine_tune(shrunk, teacher, train=data, epochs=1, batch_size=16, lr=0.02, quiet=True, hooks=ShrinkFirstConv(shrunk))
    assert shrunk[0].weight.norm() < 0.5 * plain[0].weight.norm()


def _interrupting_hooks(at_step, how):
    class Interrupt(RecordingHooks):
        def extra_loss(self, step):
            super().extra_loss(step)
            if step == at_step and how == "raise":
                raise KeyboardInterrupt

        def after_step(self, step):
            super().after_step(step)
            if step == at_step and how == "sigint":
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does

    return Interrupt()


@pytest.mark.parametrize("how, saved_step", [("sigint", 3), ("raise", 2)])
def test_resume_after_interrupt_matches_uninterrupted_run(tmp_path, how, saved_step):
    teacher = tiny_net(0)
    data = labelled(teacher, n=80)
    settings = dict(train=data, eval=data, epochs=3, batch_size=16, lr=0.05, quiet=True, seed=7)

    reference, ref_hooks = tiny_net(1, dropout=0.3), RecordingHooks()
    expected = fine_tune(reference, teacher, hooks=ref_hooks, checkpoint_dir=tmp_path / "a", **settings)

    interrupted = tiny_net(1, dropout=0.3)
    with pytest.raises(KeyboardInterrupt):
        fine_tune(interrupted, teacher, hooks=_interrupting_hooks(7, how), checkpoint_dir=tmp_path / "b", **settings)
    state = load_checkpoint(tmp_path / "b")
    assert (state["epoch"], state["step_in_epoch"]) == (1, saved_step)  # 5 steps per epoch; step 7 is epoch 1

    resumed, hooks = tiny_net(2, dropout=0.3), RecordingHooks()  # other initial weights: the checkpoint must win
    result = fine_tune(resumed, teacher, hooks=hooks, checkpoint_dir=tmp_path / "b", resume=True, **settings)
    assert result.resumed_from == {"epoch": 1, "step_in_epoch": saved_step}
    for (name, want), got in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(want, got), name
    assert result.accuracy == expected.accuracy
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    # Hooks state came back from the checkpoint, so the full run's events are there (once each, plus a 2nd begin).
    steps = [e for e in hooks.events if e[0] == "after_step"]
    assert steps == [e for e in ref_hooks.events if e[0] == "after_step"]


def test_checkpoint_each_epoch_and_resume_of_finished_run(tmp_path):
    teacher, student = tiny_net(0), tiny_net(1)
    data = labelled(teacher, n=32)
    fine_tune(student, teacher, train=data, epochs=2, batch_size=16, quiet=True, checkpoint_dir=tmp_path)
    state = load_checkpoint(tmp_path)
    assert (state["epoch"], state["step_in_epoch"]) == (2, 0) and len(state["history"]) == 2
    weights = copy.deepcopy(student.state_dict())
    again = tiny_net(3)
    result = fine_tune(again, teacher, train=data, eval=data, epochs=2, batch_size=16, quiet=True,
                       checkpoint_dir=tmp_path, resume=True)
    assert all(torch.equal(weights[k], v) for k, v in again.state_dict().items())
    assert result.accuracy is not None
    with pytest.raises(CheckpointError, match="batch_size 16 \\(checkpoint\\) vs 8 \\(now\\)"):
        fine_tune(tiny_net(1), teacher, train=data, epochs=2, batch_size=8, quiet=True, checkpoint_dir=tmp_path,
                  resume=True)
    assert checkpoint_path(tmp_path).exists() and not list(tmp_path.glob("*.tmp"))


def test_seed_makes_runs_repeatable():
    teacher = tiny_net(0)
    data = labelled(teacher, n=48)
    a, b, c = tiny_net(1, dropout=0.3), tiny_net(1, dropout=0.3), tiny_net(1, dropout=0.3)
    for model, seed in ((a, 5), (b, 5), (c, 6)):
        fine_tune(model, teacher, train=data, epochs=1, batch_size=16, quiet=True, seed=seed)
    assert torch.equal(a[0].weight, b[0].weight) and not torch.equal(a[0].weight, c[0].weight)


def test_ortmodule_missing_is_a_backend_error(monkeypatch):
    # Make the import fail the same way whether or not onnxruntime-training is installed here.
    monkeypatch.setitem(sys.modules, "onnxruntime.training", None)
    monkeypatch.setitem(sys.modules, "onnxruntime.training.ortmodule", None)
    teacher = tiny_net(0)
    with pytest.raises(BackendError, match="ORTModule.*cannot be imported.*deprecated"):
        fine_tune(tiny_net(1), teacher, train=labelled(teacher, n=16), backend="ortmodule", quiet=True)
    with pytest.raises(BackendError, match="unknown training backend 'jax'"):
        fine_tune(tiny_net(1), teacher, train=labelled(teacher, n=16), backend="jax", quiet=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_backend_error():
    teacher = tiny_net(0)
    with pytest.raises(BackendError, match="no CUDA device"):
        fine_tune(tiny_net(1), teacher, train=labelled(teacher, n=16), device="cuda", quiet=True)


def test_no_labels_and_no_teacher_is_a_data_error():
    with pytest.raises(DataError, match="no labels and there is no teacher"):
        fine_tune(tiny_net(1), None, train=synthetic_data((None, 1, 8, 8), 8), quiet=True)


def test_trains_a_lifted_onnx_graph(tmp_path):
    onnx = pytest.importorskip("onnx")
    graph = pytest.importorskip("ctprune.graph")
    torch_teacher = tiny_net(0).eval()
    path = tmp_path / "t.onnx"
    torch.onnx.export(torch_teacher, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    model = onnx.load(str(path))
    teacher, student = graph.lift(model), graph.lift(model)
    with torch.no_grad():  # perturb the student so there is something to learn back
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    data = synthetic_data((None, 1, 8, 8), 64, seed=3)
    before = kd_loss(student, teacher, data)
    fine_tune(student, teacher, train=data, epochs=3, batch_size=16, lr=0.05, quiet=True)
    assert kd_loss(student, teacher, data) < before
