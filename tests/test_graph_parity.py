"""Lifted module (eval) vs onnxruntime on fresh random inputs, one test id per model."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
import torch

from conftest import REAL_MODELS_DIR, light_model_path, randomize_placeholders, rel_err, run_ort
from ctprune.graph import lift, load_model

TOL = 1e-4


@functools.lru_cache(maxsize=None)
def _exported(net: str, exporter: str) -> bytes:
    from graph_nets import export

    return export(net, exporter).SerializeToString()


def _data_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    inits = {t.name for t in model.graph.initializer}
    return next(i for i in model.graph.input if i.name not in inits)


def _static_shape(vi, batch: int) -> list[int]:
    dims = vi.type.tensor_type.shape.dim
    return [batch if i == 0 and not d.dim_value else d.dim_value for i, d in enumerate(dims)]


def _without_final_softmax(model: onnx.ModelProto) -> onnx.ModelProto:
    """Compare logits, not saturated probabilities (a near one-hot softmax would hide errors)."""
    last = model.graph.node[-1]
    if last.op_type != "Softmax" or last.output[0] != model.graph.output[0].name:
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.node.pop()
    out = m.graph.output[0]  # Softmax keeps its input shape
    out.name = last.input[0]
    return m


def assert_parity(model: onnx.ModelProto, batch: int, seed: int, tol: float = TOL):
    tg = lift(model).eval()
    vi = _data_input(model)
    x = np.random.default_rng(seed).standard_normal(_static_shape(vi, batch)).astype(np.float32)
    with torch.no_grad():
        got = tg(torch.from_numpy(x))
    want = run_ort(model, x)[0]
    got = got.numpy()
    assert got.shape == want.shape
    assert np.abs(want).max() > 0  # a zero output would make the comparison vacuous
    err = rel_err(got, want)
    assert err < tol, f"relative error {err:.3g}"


@pytest.mark.parametrize("exporter", ["torchscript17", "dynamo18"])
@pytest.mark.parametrize("net", ["resnet", "mobilenetv2"])
def test_torch_exported(net, exporter):
    model = load_model(_exported(net, exporter))
    assert_parity(model, batch=3, seed=np.random.SeedSequence().entropy % 2**32)


LIGHT = ["vgg19", "resnet50", "squeezenet", "densenet121", "shufflenet", "inception_v1", "inception_v2",
         "bvlc_alexnet", "zfnet512"]


@pytest.mark.parametrize("name", LIGHT)
def test_light_model(name):
    path = light_model_path(name)
    if not path.exists():
        pytest.skip(f"{path.name} is not in this onnx wheel")
    model = load_model(_without_final_softmax(randomize_placeholders(onnx.load(path), seed=7)))
    torch.set_num_threads(1)
    assert_parity(model, batch=1, seed=np.random.SeedSequence().entropy % 2**32)
