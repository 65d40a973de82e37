"""Outputs never destroy inputs (issue 18, item 0b): the output, the report and the checkpoint folder may not be the
model, its external-data file, the data or each other (by path, symlink or hard link); unwritable folders and
non-regular files are refused before any work; outputs get the umask's mode."""

from __future__ import annotations

import os
import signal
import stat

import onnx
import pytest

from tests.hardening_cases import assert_user_error, cli, digest, write_model_and_data


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("paths")
    model, data = write_model_and_data(root, samples=32)
    external = root / "ext"
    external.mkdir()
    onnx.save(onnx.load(model), external / "net.onnx", save_as_external_data=True, location="net.weights",
              size_threshold=0)
    return root


def _run(model, *extra):
    return [model, "--ratio", "8x", "--epochs", "0", "--batch-size", "16", "--quiet", *extra]


def _unchanged(paths):
    before = {p: digest(p) for p in paths}
    return lambda: all(digest(p) == h for p, h in before.items())


@pytest.mark.parametrize("target", ["weights", "model-symlink", "model-hardlink"])
def test_output_may_not_be_the_model_or_its_external_data(inputs, tmp_path, capsys, target):
    model, weights = inputs / "ext" / "net.onnx", inputs / "ext" / "net.weights"
    same = _unchanged([model, weights])
    if target == "weights":
        out = weights
    else:
        out = tmp_path / "out.onnx"
        (os.symlink if target == "model-symlink" else os.link)(model, out)
    assert_user_error(capsys, _run(model, "-o", out), "never overwrites")
    assert same()


def test_report_may_not_be_the_models_external_data(inputs, tmp_path, capsys):
    model, weights = inputs / "ext" / "net.onnx", inputs / "ext" / "net.weights"
    same = _unchanged([model, weights])
    assert_user_error(capsys, _run(model, "-o", tmp_path / "out.onnx", "--report", weights), "the report",
                      "external data")
    assert same() and not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("which", ["-o", "--report"])
@pytest.mark.parametrize("data_flag", ["--data", "--eval-data"])
def test_outputs_may_not_be_the_data(inputs, tmp_path, capsys, which, data_flag):
    data = tmp_path / "d.npz"
    data.write_bytes((inputs / "d.npz").read_bytes())
    same = _unchanged([data])
    outs = ["-o", tmp_path / "out.onnx"] if which == "--report" else []
    assert_user_error(capsys, _run(inputs / "net.onnx", data_flag, data, which, data, *outs), data_flag)
    assert same()


def test_report_may_not_be_the_output(inputs, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert_user_error(capsys, _run(inputs / "net.onnx", "-o", out, "--report", out), "the same file")
    link = tmp_path / "link.json"
    os.symlink(out, link)
    out.write_bytes(b"an older output")
    assert_user_error(capsys, _run(inputs / "net.onnx", "-o", out, "--report", link), "the same file")


def test_checkpoint_folder_may_not_hold_or_be_an_input(inputs, tmp_path, capsys):
    folder = tmp_path / "out.onnx.ckpt"
    folder.mkdir()
    model = folder / "net.onnx"
    model.write_bytes((inputs / "net.onnx").read_bytes())
    assert_user_error(capsys, _run(model, "-o", tmp_path / "out.onnx"), "checkpoint folder")
    assert model.exists()
    # --data naming the folder the checkpoint would live in
    assert_user_error(capsys, _run(inputs / "net.onnx", "-o", tmp_path / "out.onnx", "--data", folder),
                      "checkpoint folder")


@pytest.mark.parametrize("which", ["-o", "--report"])
def test_unwritable_folder_is_refused_before_work(inputs, tmp_path, capsys, which):
    # /proc refuses new files even to root, where a chmod-ed folder would not
    args = _run(inputs / "net.onnx", which, "/proc/ctprune-out")
    if which == "--report":
        args += ["-o", tmp_path / "out.onnx"]
    assert_user_error(capsys, args, "not writable")
    assert not (tmp_path / "out.onnx").exists()


def test_output_that_is_a_fifo_is_refused(inputs, tmp_path, capsys):
    fifo = tmp_path / "out.onnx"
    os.mkfifo(fifo)
    assert_user_error(capsys, _run(inputs / "net.onnx", "-o", fifo), "not a regular file")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


@pytest.fixture
def no_hang():
    """A blocking open() of a FIFO would hang the test: an alarm turns that into a failure."""
    def fail(signum, frame):
        raise TimeoutError("ctprune blocked on a FIFO")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_model_and_data_that_are_fifos_are_refused(inputs, tmp_path, capsys, no_hang):
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    assert_user_error(capsys, _run(fifo, "-o", tmp_path / "out.onnx"), "not a regular file")
    data = tmp_path / "d.npz"
    os.mkfifo(data)
    assert_user_error(capsys, _run(inputs / "net.onnx", "-o", tmp_path / "out.onnx", "--data", data),
                      "not a regular file")
    code, err = cli(capsys, "inspect", fifo)
    assert code == 2 and "not a regular file" in err


def test_outputs_follow_the_umask(inputs, tmp_path, capsys):
    previous = os.umask(0o027)
    try:
        code, err = cli(capsys, *_run(inputs / "net.onnx", "-o", tmp_path / "out.onnx", "--report",
                                      tmp_path / "r.json"))
    finally:
        os.umask(previous)
    assert code == 0, err
    for name in ("out.onnx", "r.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o640, name
