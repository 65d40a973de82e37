"""Bad data gets one true message, exit 2, no traceback (issue 18, item 6): object arrays, damaged members, NaN,
no samples, a bad or mismatched --input-size, and a model with free H and W refused before any training."""

from __future__ import annotations

import zipfile

import numpy as np
import onnx
import pytest

import ctprune.train
from tests.hardening_cases import SIZE, assert_user_error, cli, write_model_and_data


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_model_and_data(root, samples=32)
    return root


def _run(root, data, *extra, epochs="0"):
    """CLI arguments; the output goes to root/out.onnx unless `extra` gives another -o (the last one wins)."""
    return [root / "net.onnx", "--ratio", "8x", "--epochs", epochs, "--batch-size", "16", "--quiet",
            "-o", root / "out.onnx", *(["--data", data] if data is not None else []), *extra]


def _x(n=32, size=SIZE):
    return np.random.default_rng(1).standard_normal((n, 3, size, size)).astype(np.float32)


def test_object_array(inputs, tmp_path, capsys):
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([np.zeros(3), "a"], dtype=object))
    assert_user_error(capsys, _run(inputs, path), "objects.npz", "dtype object")


def test_damaged_member(inputs, tmp_path, capsys):
    path = tmp_path / "damaged.npz"
    np.savez(path, x=_x())
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2  # inside x's data: the archive opens, reading x fails its CRC
    raw[middle:middle + 64] = bytes(64)
    path.write_bytes(bytes(raw))
    assert_user_error(capsys, _run(inputs, path), "damaged.npz", "'x' cannot be read")


def test_member_that_is_not_an_array(inputs, tmp_path, capsys):
    path = tmp_path / "text.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", b"this is not an array")
    assert_user_error(capsys, _run(inputs, path), "text.npz", "'x' cannot be read")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("flag", ["--data", "--eval-data"])
def test_nan_or_inf_in_data_is_named_not_divergence(inputs, tmp_path, capsys, bad, flag):
    x = _x()
    x[5, 1, 2, 3] = bad
    path = tmp_path / "nan.npz"
    np.savez(path, x=x)
    args = _run(inputs, None, flag, path, "-o", tmp_path / "out.onnx", epochs="1")
    line = assert_user_error(capsys, args, "nan.npz", "NaN or Inf", "sample 5")
    assert "diverged" not in line


def test_no_samples(inputs, tmp_path, capsys):
    path = tmp_path / "empty.npz"
    np.savez(path, x=np.zeros((0, 3, SIZE, SIZE), np.float32))
    assert_user_error(capsys, _run(inputs, path), "empty.npz", "no samples")


@pytest.mark.parametrize("size,needle", [("28x28", "not a comma-separated list of integers"), ("28,28,28", "not two positive integers"),
                                         ("0,12", "not two positive integers"), ("28,28", "does not fit")])
@pytest.mark.parametrize("with_data", [True, False])
def test_bad_input_size_is_named(inputs, tmp_path, capsys, size, needle, with_data):
    data = inputs / "d.npz" if with_data else None
    args = _run(inputs, data, "--input-size", size, "-o", tmp_path / "out.onnx")
    assert_user_error(capsys, args, "--input-size", needle)


def test_matching_input_size_is_accepted(inputs, tmp_path, capsys):
    code, err = cli(capsys, *_run(inputs, inputs / "d.npz", "--input-size", f"{SIZE},{SIZE}", "-o",
                                  tmp_path / "out.onnx"))
    assert code == 0, err


def test_free_image_size_is_refused_before_training(inputs, tmp_path, capsys, monkeypatch):
    model = onnx.load(inputs / "net.onnx")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    del model.graph.value_info[:]
    free = tmp_path / "free.onnx"
    onnx.save(model, free)

    def no_training(*args, **kwargs):
        raise AssertionError("trained before refusing the model")

    monkeypatch.setattr(ctprune.train, "fine_tune", no_training)
    args = _run(inputs, inputs / "d.npz", epochs="1")
    args[0] = free
    args[args.index("-o") + 1] = tmp_path / "out.onnx"
    assert_user_error(capsys, args, "free dimensions besides the batch")
    assert not (tmp_path / "out.onnx").exists()
