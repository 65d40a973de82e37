"""Shared pieces of the hardening tests: a small model and data on disk, and the user-error assertion
(exit 2, one `ctprune: error:` line, no traceback)."""

from __future__ import annotations

import hashlib
import pathlib

import numpy as np
import onnx

from ctprune.cli import run
from tests.graph_nets import export

SIZE = 12


def write_model_and_data(root: pathlib.Path, samples: int = 48) -> tuple[pathlib.Path, pathlib.Path]:
    """root/net.onnx (a small exported ResNet, 3x12x12 inputs, 10 classes) and root/d.npz (x, y)."""
    model = root / "net.onnx"
    onnx.save(export("resnet", "torchscript17", size=SIZE), model)
    rng = np.random.default_rng(0)
    data = root / "d.npz"
    np.savez(data, x=rng.standard_normal((samples, 3, SIZE, SIZE)).astype(np.float32),
             y=rng.integers(0, 10, samples).astype(np.int64))
    return model, data


def digest(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def cli(capsys, *args) -> tuple[int, str]:
    code = run([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_user_error(capsys, args, *needles) -> str:
    """Run the CLI in-process: exit 2, exactly one error line naming every needle, no traceback. Returns the line."""
    code, err = cli(capsys, *args)
    lines = [line for line in err.splitlines() if line.startswith("ctprune: error:")]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
