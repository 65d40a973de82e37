"""Checkpoints run no code and `--resume` with other settings names every difference (issue 18, item 0).

A real run is interrupted (a real SIGINT mid-epoch, as Ctrl-C sends) to leave OUT.ckpt/ with ctprune's run file and
a training state; each test works on a copy of that folder."""

from __future__ import annotations

import os
import pickle
import shutil
import signal

import pytest
import torch

from ctprune.pruning import ClickTrainPruner
from ctprune.train.checkpoint import CHECKPOINT_NAME, RUN_FILE, load_checkpoint, remove_run_folder
from tests.hardening_cases import assert_user_error, cli, write_model_and_data


def _args(root, out, *extra):
    return [root / "net.onnx", "--ratio", "8x", "--method", "pattern", "--data", root / "d.npz", "--epochs", "2",
            "--batch-size", "16", "--seed", "1", "-o", out, "--quiet", *extra]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """(inputs folder, a pristine OUT.ckpt left by an interrupted run)."""
    root = tmp_path_factory.mktemp("ckpt")
    write_model_and_data(root)
    original = ClickTrainPruner.after_backward

    def interrupt_at_step_1(self, step):
        original(self, step)
        if step == 1:
            signal.raise_signal(signal.SIGINT)

    ClickTrainPruner.after_backward = interrupt_at_step_1
    try:
        from ctprune.cli import run

        assert run([str(a) for a in _args(root, root / "out.onnx")]) == 130
    finally:
        ClickTrainPruner.after_backward = original
    folder = root / "out.onnx.ckpt"
    assert (folder / CHECKPOINT_NAME).is_file() and (folder / RUN_FILE).is_file()
    return root, folder


@pytest.fixture
def run_dir(interrupted, tmp_path):
    """tmp_path/out.onnx.ckpt: a copy of the interrupted run's folder, beside where the output goes."""
    _, folder = interrupted
    shutil.copytree(folder, tmp_path / "out.onnx.ckpt")
    return tmp_path


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(path, marker, how):
    payload = {"config": _RunsCode(marker), "epoch": 0}
    if how == "torch.save":
        torch.save(payload, path)
    elif how == "protocol 4":  # STACK_GLOBAL instead of GLOBAL
        torch.save(payload, path, pickle_protocol=4)
    elif how == "raw pickle":  # torch.load's legacy (non-zip) format
        path.write_bytes(pickle.dumps(payload))
    else:  # a zip whose pickle calls os.system through the tensor-rebuild allow-list's neighbour: builtins.eval
        torch.save({"x": torch.zeros(1)}, path)
        import zipfile

        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            files = {n: z.read(n) for n in names}
        pkl = next(n for n in names if n.endswith("data.pkl"))
        files[pkl] = b"\x80\x02cbuiltins\neval\nq\x00X\x10\x00\x00\x00__import__('os')q\x01\x85q\x02Rq\x03."
        with zipfile.ZipFile(path, "w") as z:
            for n in names:
                z.writestr(n, files[n])


@pytest.mark.parametrize("how", ["torch.save", "protocol 4", "raw pickle", "builtins.eval"])
def test_planted_checkpoint_runs_nothing(interrupted, run_dir, capsys, how):
    root, _ = interrupted
    marker = run_dir / "code-ran"
    _plant(run_dir / "out.onnx.ckpt" / CHECKPOINT_NAME, marker, how)
    line = assert_user_error(capsys, _args(root, run_dir / "out.onnx", "--resume"), CHECKPOINT_NAME,
                             "does not load it")
    assert not marker.exists(), "loading the checkpoint executed code"
    assert not (run_dir / "out.onnx").exists()
    assert (run_dir / "out.onnx.ckpt" / CHECKPOINT_NAME).exists(), line  # the user is told to delete it; we do not


def test_a_real_checkpoint_holds_only_tensors_and_plain_data(interrupted):
    _, folder = interrupted
    state = load_checkpoint(folder)
    torch.load(folder / CHECKPOINT_NAME, weights_only=True)  # torch's own safe loader agrees

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        else:
            assert value is None or isinstance(value, (torch.Tensor, bool, int, float, str)), type(value)

    walk(state)


def test_resume_with_other_settings_names_every_difference(interrupted, run_dir, capsys):
    root, _ = interrupted
    args = _args(root, run_dir / "out.onnx", "--resume")
    changed = {"--ratio": "4x", "--patterns": "6", "--allocation": "macs", "--lr": "0.02", "--seed": "3",
               "--epochs": "3", "--batch-size": "8"}
    for flag, value in changed.items():
        i = args.index(flag) if flag in args else None
        if i is None:
            args += [flag, value]
        else:
            args[i + 1] = value
    line = assert_user_error(capsys, args, "other settings", "ratio 8.0 (checkpoint) vs 4.0 (now)",
                             "patterns 8 (checkpoint) vs 6 (now)", "allocation balanced (checkpoint) vs macs (now)",
                             "lr none (checkpoint) vs 0.02 (now)", "seed 1 (checkpoint) vs 3 (now)",
                             "epochs 2 (checkpoint) vs 3 (now)", "batch_size 16 (checkpoint) vs 8 (now)")
    assert "--resume" not in line or "delete" in line
    assert not (run_dir / "out.onnx").exists()


def test_resume_with_other_data_or_method_is_named(interrupted, run_dir, capsys):
    root, _ = interrupted
    other = run_dir / "other.npz"
    shutil.copy(root / "d.npz", other)
    args = _args(root, run_dir / "out.onnx", "--resume")
    args[args.index("--method") + 1] = "both"
    args[args.index("--data") + 1] = other
    assert_user_error(capsys, args, "method pattern (checkpoint) vs both (now)", "data ", "other.npz (now)")


def test_a_folder_ctprune_did_not_make_is_refused_and_kept(interrupted, tmp_path, capsys):
    root, _ = interrupted
    mine = tmp_path / "out.onnx.ckpt"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert_user_error(capsys, _args(root, tmp_path / "out.onnx"), "was not made by ctprune")
    assert (mine / "notes.txt").read_text() == "keep me"
    # --epochs 0 keeps no checkpoint: the run goes ahead and the folder stays as it was
    args = _args(root, tmp_path / "out.onnx")
    args[args.index("--epochs") + 1] = "0"
    code, err = cli(capsys, *args)
    assert code == 0, err
    assert (mine / "notes.txt").read_text() == "keep me"


def test_removing_a_run_folder_keeps_what_the_user_put_inside(tmp_path):
    folder = tmp_path / "run.ckpt"
    (folder / "precrop").mkdir(parents=True)
    (folder / RUN_FILE).write_text("{}")
    (folder / CHECKPOINT_NAME).write_bytes(b"x")
    (folder / "precrop" / CHECKPOINT_NAME).write_bytes(b"x")
    (folder / "mine.txt").write_text("keep")
    remove_run_folder(folder)
    assert sorted(p.name for p in folder.rglob("*")) == ["mine.txt"]
    (folder / "mine.txt").unlink()
    (folder / RUN_FILE).write_text("{}")
    remove_run_folder(folder)
    assert not folder.exists()
    unmarked = tmp_path / "unmarked"
    unmarked.mkdir()
    (unmarked / CHECKPOINT_NAME).write_bytes(b"x")
    remove_run_folder(unmarked)
    assert (unmarked / CHECKPOINT_NAME).exists()


def test_ctrl_c_message_says_where_the_checkpoint_is(interrupted, tmp_path, capsys, monkeypatch):
    root, _ = interrupted
    original = ClickTrainPruner.after_backward

    def interrupt(self, step):
        original(self, step)
        if step == 0:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(ClickTrainPruner, "after_backward", interrupt)
    code, err = cli(capsys, *_args(root, tmp_path / "out.onnx"))
    assert code == 130 and "Traceback" not in err
    assert f"the checkpoint is in {tmp_path / 'out.onnx.ckpt'}" in err and "--resume" in err
