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


def without_final_squash(model: onnx.ModelProto, inplace: bool = False) -> onnx.ModelProto:
    """Compare logits, not saturated probabilities: on random inputs a final Softmax/Sigmoid is near one-hot or near
    zero, which would hide errors (or blow up the relative error of values ~1e-6)."""
    last = model.graph.node[-1]
    if last.op_type not in ("Softmax", "Sigmoid") or last.output[0] != model.graph.output[0].name:
        return model
    if inplace:
        m = model
    else:
        m = onnx.ModelProto()
        m.CopyFrom(model)
    m.graph.node.pop()
    out = m.graph.output[0]  # Softmax keeps its input shape
    out.name = last.input[0]
    return m


def assert_parity(model: onnx.ModelProto, batch: int, seed: int, tol: float = TOL, shape=None, serialized=None):
    tg = lift(model).eval()
    shape = shape or _static_shape(_data_input(model), batch)
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        got = tg(torch.from_numpy(x))
    want = run_ort(serialized or model, x)[0]
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


LIGHT = ["vgg19", "resnet50", "squeezenet", "densenet121", "shufflenet", "inception_v1", "inception_v2"]


@pytest.mark.parametrize("name", LIGHT)
def test_light_model(name):
    path = light_model_path(name)
    if not path.exists():
        pytest.skip(f"{path.name} is not in this onnx wheel")
    # Serialised once and shared by the checker and onnxruntime: VGG-19 carries 575 MB of weights.
    model = randomize_placeholders(onnx.load(path), seed=7, inplace=True)
    data = without_final_squash(model, inplace=True).SerializeToString()
    del model
    torch.set_num_threads(1)
    assert_parity(load_model(data), batch=1, seed=np.random.SeedSequence().entropy % 2**32, serialized=data)


# Real pretrained models from non-PyTorch exporters (scripts/fetch_real_models.sh, run by `make setup`).
REAL = {
    # name: (file, input shape for the test, what it exercises)
    "paddle_cls": ("paddle_ppocr_cls.onnx", (2, 3, 48, 192)),  # paddle2onnx, Constant-node weights, BN, HardSigmoid
    "paddle_det": ("paddle_ppocr_det.onnx", (1, 3, 96, 128)),  # paddle2onnx, Resize, ConvTranspose, dynamic H/W
    "tf_nhwc": ("tf_speech_embedding.onnx", (2, 76, 32, 1)),  # tf2onnx, NHWC input, LeakyRelu/Max, Pad
}


def real_model(name: str) -> onnx.ModelProto:
    path = REAL_MODELS_DIR / REAL[name][0]
    if not path.exists():
        pytest.skip(f"{path} is missing: run `make setup` (scripts/fetch_real_models.sh) to fetch it")
    return load_model(path)


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_model(name):
    model = without_final_squash(real_model(name))
    assert_parity(model, batch=0, seed=np.random.SeedSequence().entropy % 2**32, shape=list(REAL[name][1]))


def test_paddle_weights_are_constant_nodes():
    """The Paddle model really stores its weights as Constant nodes, and they are lifted as parameters."""
    model = real_model("paddle_cls")
    assert not model.graph.initializer
    constants = {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    assert conv_weights <= constants
    params = lift(model).onnx_parameters()
    assert conv_weights <= set(params)


def test_tf_model_is_nhwc():
    model = real_model("tf_nhwc")
    tg = lift(model)
    assert tg.input_shapes[0][1:] == (76, 32, 1) and tg.input_shapes[0][0] is None  # batch stays dynamic
