"""PatternConv's kernel takes exactly the attribute types the model-local function (ops/reference.py) takes.

Every attribute, given as every other attribute kind (INT for INTS, FLOAT for INT, FLOATS, STRING, STRINGS, TENSOR), is
run twice: through ctprune's kernel and through the function alone (plain onnxruntime). Both must refuse it, the
kernel with a message naming the attribute (an onnxruntime error, not a crash and never a silently different answer,
as `activation_min=0` as an INT once was: read as the default -inf, it changed 5 of 8 predictions). Missing required
attributes are refused by both; missing optional ones take the spec's default in both, with equal outputs.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime.capi.onnxruntime_pybind11_state as ort_state
import pytest
from onnx import AttributeProto, helper, numpy_helper

from ctprune.lab.bench_layers import session
from ctprune.lab.layer_model import pattern_conv_model, random_pattern_layer
from ctprune.ops.reference import pattern_conv_function

ORT_ERRORS = (ort_state.Fail, ort_state.InvalidArgument, ort_state.InvalidGraph, ort_state.RuntimeException,
              ort_state.NotImplemented)
KINDS = ["INT", "FLOAT", "INTS", "FLOATS", "STRING", "STRINGS", "TENSOR"]
SCHEMA = {  # the function's declared attribute types
    "weight_shape": "INTS", "patterns": "INTS", "filter_runs": "INTS", "kernel_codes": "INTS",
    "strides": "INTS", "pads": "INTS", "dilations": "INTS", "group": "INT",
    "activation_min": "FLOAT", "activation_max": "FLOAT",
}
REQUIRED = ["weight_shape", "patterns", "filter_runs", "kernel_codes"]
# onnxruntime's function inliner lets a TENSOR through where these attributes feed Constant(value_ints=...) and
# nothing checks their type: the function then runs on the tensor's values. The schema says INTS; the kernel keeps to it.
FUNCTION_LAXER = {("patterns", "TENSOR"), ("filter_runs", "TENSOR"), ("kernel_codes", "TENSOR")}


def base_model():
    layer = random_pattern_layer(np.random.default_rng(1), 4, 3, [3, 2, 1, 0])
    return pattern_conv_model(layer, (1, 3, 5, 5), activation=(0.0, 6.0))


def with_function(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.functions.append(pattern_conv_function(17))
    return out


def wrong_typed(attribute: AttributeProto, kind: str) -> AttributeProto:
    """`attribute`'s values (as far as they go) as an attribute of another kind."""
    if attribute.type == AttributeProto.INTS:
        ints = list(attribute.ints)
    elif attribute.type == AttributeProto.INT:
        ints = [attribute.i]
    else:
        ints = [int(attribute.f) if math.isfinite(attribute.f) else 0]
    name = attribute.name
    if kind == "INT":
        return helper.make_attribute(name, ints[0] if ints else 0)
    if kind == "FLOAT":
        return helper.make_attribute(name, float(ints[0]) if ints else 0.0)
    if kind == "INTS":
        return helper.make_attribute(name, ints, attr_type=AttributeProto.INTS)
    if kind == "FLOATS":
        return helper.make_attribute(name, [float(v) for v in ints] or [0.0], attr_type=AttributeProto.FLOATS)
    if kind == "STRING":
        return helper.make_attribute(name, "1")
    if kind == "STRINGS":
        return helper.make_attribute(name, [str(v) for v in ints] or ["x"])
    return helper.make_attribute(name, numpy_helper.from_array(np.array(ints, np.int64)))


def replaced(model: onnx.ModelProto, name: str, attribute: AttributeProto | None) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    node = out.graph.node[0]
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept + ([attribute] if attribute is not None else []))
    return out


def run(model, library=None):
    x = np.random.default_rng(0).standard_normal((1, 3, 5, 5)).astype(np.float32)
    return session(model, 1, library).run(None, {"X": x})[0]


CASES = [(name, kind) for name in SCHEMA for kind in KINDS if kind != SCHEMA[name]]


@pytest.mark.parametrize("name, kind", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_wrong_attribute_type_is_refused_like_the_function(library, name, kind):
    model = base_model()
    attribute = next(a for a in model.graph.node[0].attribute if a.name == name)
    bad = replaced(model, name, wrong_typed(attribute, kind))
    with pytest.raises(ORT_ERRORS, match=name):  # STRINGS read as an empty list: then a length or range names it
        run(bad, library)
    if (name, kind) in FUNCTION_LAXER:
        np.testing.assert_allclose(run(with_function(bad)), run(with_function(model)), rtol=1e-6, atol=1e-6)
        return
    with pytest.raises(ORT_ERRORS):
        run(with_function(bad))


def test_activation_given_as_int_is_not_read_as_the_default(library):
    # the case that changed predictions: Relu's lower bound as INT 0 must not become -inf
    model = base_model()
    with pytest.raises(ORT_ERRORS, match="'activation_min' must be a FLOAT, got an INT"):
        run(replaced(model, "activation_min", helper.make_attribute("activation_min", 0)), library)
    with pytest.raises(ORT_ERRORS, match="'group' must be an INT, got FLOATS"):
        run(replaced(model, "group", helper.make_attribute("group", [1.0])), library)


@pytest.mark.parametrize("name", REQUIRED)
def test_missing_required_attribute_is_refused_by_both(library, name):
    bad = replaced(base_model(), name, None)
    with pytest.raises(ORT_ERRORS, match=f"required attribute '{name}' \\(INTS\\) is missing"):
        run(bad, library)
    with pytest.raises(ORT_ERRORS):
        run(with_function(bad))


@pytest.mark.parametrize("name", [n for n in SCHEMA if n not in REQUIRED])
def test_missing_optional_attribute_takes_the_default_in_both(library, name):
    model = replaced(base_model(), name, None)
    np.testing.assert_allclose(run(model, library), run(with_function(model)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, value, match", [
    ("strides", [1, 1, 1], "'strides' must hold 2 values"),
    ("pads", [1, 1], "'pads' must hold 4 values"),
    ("weight_shape", [4, 3, 3], "'weight_shape' must hold 4 values"),
    ("strides", [0, 1], "'strides' must hold values in 1..1024"),
    ("pads", [1, -1, 1, 1], "'pads' .* must hold values in 0..1024"),
    ("weight_shape", [4, 0, 3, 3], "O and C in 1.."),
    ("group", 2, "'group' must be 1"),
])
def test_wrong_length_or_range_names_the_attribute(library, name, value, match):
    bad = replaced(base_model(), name, helper.make_attribute(name, value))
    with pytest.raises(ORT_ERRORS, match=match):
        run(bad, library)


def test_nan_activation_bound_is_refused(library):
    bad = replaced(base_model(), "activation_max", helper.make_attribute("activation_max", float("nan")))
    with pytest.raises(ORT_ERRORS, match="'activation_max' must not be NaN"):
        run(bad, library)


def test_no_kernel_left_and_an_empty_library_run_alike(library):
    """A layer with no kernel left needs no pattern: the kernel runs it with `patterns` empty, and so must the
    function, which decodes kernel_codes by P (it divided by 0 once: found by `make asan`'s fuzz run)."""
    layer = random_pattern_layer(np.random.default_rng(3), 4, 3, 0)  # K = 0
    model = pattern_conv_model(layer, (1, 3, 5, 5), bias=np.arange(4, dtype=np.float32), activation=(0.0, 6.0))
    model = replaced(model, "patterns", helper.make_attribute("patterns", [], attr_type=AttributeProto.INTS))
    got = run(model, library)
    np.testing.assert_allclose(got, run(with_function(model)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, np.broadcast_to(np.clip(np.arange(4.0), 0, 6)[None, :, None, None], got.shape))


@pytest.mark.xfail(strict=True, reason="onnxruntime's C API reads every empty list as empty INTS: an empty FLOATS "
                                      "kernel list (a layer with no kernel left) cannot be told apart")
def test_empty_list_of_another_type(library):
    layer = random_pattern_layer(np.random.default_rng(2), 4, 3, 0)  # every kernel removed: K = 0
    model = pattern_conv_model(layer, (1, 3, 5, 5))
    bad = replaced(model, "kernel_codes", helper.make_attribute("kernel_codes", [], attr_type=AttributeProto.FLOATS))
    with pytest.raises(ORT_ERRORS):
        run(with_function(bad))  # the function refuses it ...
    with pytest.raises(ORT_ERRORS):
        run(bad, library)  # ... the kernel cannot tell
