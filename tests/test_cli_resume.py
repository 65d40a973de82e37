"""Ctrl-C in the middle of an epoch leaves a checkpoint and no output; `--resume` finishes the same run."""

from __future__ import annotations

import signal

import numpy as np
import onnx
import pytest

from ctprune.cli import run
from ctprune.pruning import ClickTrainPruner
from tests.graph_nets import export


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    onnx.save(export("resnet", "torchscript17", size=12), root / "net.onnx")
    rng = np.random.default_rng(0)
    np.savez(root / "d.npz", x=rng.standard_normal((48, 3, 12, 12)).astype(np.float32),
             y=rng.integers(0, 10, 48).astype(np.int64))
    return root


def _args(root, out):
    return [str(root / "net.onnx"), "--ratio", "8x", "--data", str(root / "d.npz"), "--epochs", "2",
            "--batch-size", "16", "--seed", "1", "-o", str(out), "--quiet"]


def _weights(path):
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def test_ctrl_c_mid_epoch_then_resume_completes_the_same_run(setup, tmp_path, monkeypatch, capsys):
    reference = tmp_path / "reference.onnx"
    assert run(_args(setup, reference)) == 0

    out = tmp_path / "out.onnx"
    original_after_backward = ClickTrainPruner.after_backward

    def interrupt_at_step_4(self, step):  # a real SIGINT, as Ctrl-C sends, in the middle of epoch 2
        original_after_backward(self, step)
        if step == 4:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(ClickTrainPruner, "after_backward", interrupt_at_step_4)
    assert run(_args(setup, out)) == 130
    assert not out.exists(), "an interrupted run must not leave an output"
    assert (tmp_path / "out.onnx.ckpt").exists(), "an interrupted run must leave a checkpoint to resume from"

    monkeypatch.setattr(ClickTrainPruner, "after_backward", original_after_backward)
    assert run(_args(setup, out) + ["--resume"]) == 0, capsys.readouterr().err
    assert out.exists() and not (tmp_path / "out.onnx.ckpt").exists()
    want, got = _weights(reference), _weights(out)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
