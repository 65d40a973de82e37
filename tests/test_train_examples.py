"""The Fashion-MNIST example: idx parsing, the two nets' shapes, and the committed ONNX models."""

import gzip
import pathlib
import struct

import numpy as np
import pytest
import torch

from examples.fmnist import MEAN, STD, ResNet20, VGGNet, load_fmnist

MODELS = pathlib.Path(__file__).resolve().parent.parent / "examples" / "models"


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_parse_and_normalise(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    x, y = load_fmnist("test", tmp_path)
    assert x.shape == (5, 1, 28, 28) and x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_allclose(x[:, 0], (images / 255.0 - MEAN) / STD, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y, labels)


@pytest.mark.parametrize("net", [ResNet20, VGGNet])
def test_nets_classify_28x28(net):
    model = net().eval()
    with torch.no_grad():
        assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) * 4 < 2 * 1024 * 1024


@pytest.mark.parametrize("name", ["resnet20_fmnist.onnx", "vgg_fmnist.onnx"])
def test_committed_models_run_with_any_batch(name):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = MODELS / name
    if not path.exists():
        pytest.skip(f"{name} not trained yet (examples/train_fmnist.py)")
    assert path.stat().st_size <= 2 * 1024 * 1024
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        out = sess.run(None, {"input": np.random.default_rng(batch).standard_normal((batch, 1, 28, 28),
                                                                                   dtype=np.float32)})[0]
        assert out.shape == (batch, 10) and np.isfinite(out).all()


@pytest.mark.parametrize("name, floor", [("resnet20_fmnist", 0.89), ("vgg_fmnist", 0.89)])
def test_committed_models_are_accurate(name, floor):
    ort = pytest.importorskip("onnxruntime")
    path = MODELS / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path.name} not trained yet (examples/train_fmnist.py)")
    try:
        x, y = load_fmnist("test")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST not fetched (make setup)")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pred = sess.run(None, {"input": x[:2000]})[0].argmax(1)
    assert np.mean(pred == y[:2000]) >= floor
