"""PreCropping on a real model-zoo graph: DenseNet-121 from the onnx wheel's backend tests (IR 3, opset 9, Concat-heavy,
Caffe2-style per-channel Mul/Add after every BN, weights made by ConstantOfShape)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ctprune.graph import normalize
from ctprune.pruning.precrop import apply_crop, plan_crop
from test_precrop_crop import conv_weight_count, masked_model, rel_err
from test_precrop_nets import run

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", "light_densenet121.onnx")
pytestmark = [pytest.mark.skipif(not os.path.exists(LIGHT), reason="onnx wheel without backend-test models"),
              pytest.mark.usefixtures("one_torch_thread")]



@pytest.fixture(scope="module")
def densenet121():
    """The model with its placeholder weights folded and replaced by random ones (so outputs mean something)."""
    model = normalize(onnx.load(LIGHT))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype == np.float32 and a.ndim >= 1:
            positive = any(s in init.name for s in ("var", "scale", "_w_0")) and a.ndim == 1
            v = rng.uniform(0.5, 1.5, a.shape) if positive else rng.normal(0, 0.05, a.shape)
            init.CopyFrom(numpy_helper.from_array(v.astype(np.float32), init.name))
    return model


def test_raw_backend_model_is_cropped_at_2x_and_4x():
    raw = onnx.load(LIGHT)  # weights are ConstantOfShape outputs: plan_crop folds them first
    x = np.random.default_rng(1).normal(size=(1, 3, 224, 224)).astype(np.float32)
    for ratio in (2, 4):
        plan = plan_crop(raw, ratio, pai="erk")
        cropped = apply_crop(raw, plan)
        assert abs(plan.ratio_achieved / ratio - 1) <= 0.05
        assert run(cropped, x).shape == (1, 1000, 1, 1)
        assert [o.name for o in cropped.graph.output] == [o.name for o in raw.graph.output]


def test_densenet121_crop_equals_masked_model(densenet121):
    plan = plan_crop(densenet121, 4, pai="erk")
    cropped = apply_crop(densenet121, plan)
    achieved = conv_weight_count(densenet121) / conv_weight_count(cropped)
    assert abs(achieved / 4 - 1) <= 0.05
    x = np.random.default_rng(2).normal(size=(1, 3, 224, 224)).astype(np.float32)
    assert rel_err(run(cropped, x), run(masked_model(densenet121, plan), x)) < 1e-5
