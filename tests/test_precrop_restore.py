"""The crop restores the dense model's per-channel output statistics (precrop/restore.py) when given data.

The collapse it prevents: a net whose BatchNormalization was folded into its Convs (biases set for all the input
channels) loses, at every cropped layer, part of each pre-activation's spread while the bias stays, until its output
no longer depends on its input (the examples' MobileNetV2 at 8x predicted one class for every image).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ctprune.pruning.precrop import apply_crop, plan_crop
from ctprune.pruning.precrop.restore import match_statistics
from test_precrop_nets import as_ir3, mobilenet_v2, run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def folded_chain(x: np.ndarray, width=64, depth=8, classes=10, features=4, noise=0.3, seed=0) -> onnx.ModelProto:
    """Conv 1x1 + ReLU6 layers whose BN was folded in at export: each Conv's weight and bias normalise its output on
    `x` to a per-channel std ~U(0.5, 1.5) and mean ~U(0.2, 1.0) (what BN's scale and shift would be after training),
    then global pooling and a classifier."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    a = x.astype(np.float64)
    name, c_in = "input", x.shape[1]
    for i in range(depth):
        # redundant channels, the kind a channel crop relies on: channel o is a noisy copy of feature o % `features`,
        # so a crop that keeps some copies of every feature keeps the information and only shrinks the sums
        mix = rng.normal(0, 1, (features, features))
        w = mix[np.arange(width) % features][:, np.arange(c_in) % features] + noise * rng.normal(0, 1, (width, c_in))
        pre = np.einsum("oc,nchw->nohw", w, a)
        mean, std = pre.mean(axis=(0, 2, 3)), pre.std(axis=(0, 2, 3))
        gamma, beta = rng.uniform(0.5, 1.5, width), rng.uniform(0.2, 1.0, width)
        w, b = w * (gamma / std)[:, None], beta - mean * gamma / std
        a = np.clip(np.einsum("oc,nchw->nohw", w, a) + b[None, :, None, None], 0, 6)
        inits += [numpy_helper.from_array(w[:, :, None, None].astype(np.float32), f"conv{i}.weight"),
                  numpy_helper.from_array(b.astype(np.float32), f"conv{i}.bias")]
        nodes += [helper.make_node("Conv", [name, f"conv{i}.weight", f"conv{i}.bias"], [f"conv{i}"], name=f"conv{i}",
                                   kernel_shape=[1, 1]),
                  helper.make_node("Clip", [f"conv{i}", "zero", "six"], [f"relu{i}"], name=f"relu{i}")]
        name, c_in = f"relu{i}", width
    inits += [numpy_helper.from_array(np.array(0, np.float32), "zero"),
              numpy_helper.from_array(np.array(6, np.float32), "six"),
              numpy_helper.from_array(rng.normal(0, 0.3, (classes, width)).astype(np.float32), "fc.weight"),
              numpy_helper.from_array(np.zeros(classes, np.float32), "fc.bias")]
    nodes += [helper.make_node("GlobalAveragePool", [name], ["pool"], name="pool"),
              helper.make_node("Flatten", ["pool"], ["flat"], name="flat", axis=1),
              helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "folded_chain",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, *x.shape[1:]])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def images(n=256, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 3, 6, 6)).astype(np.float32)


def with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    return out


def spread(y: np.ndarray) -> float:
    """How much an output varies from input to input: the std over the batch, averaged over its elements."""
    return float(y.std(axis=0).mean())


def test_folded_bn_net_cropped_without_statistics_collapses_and_with_them_tracks_the_dense_one():
    x, held_out = images(), images(seed=2)
    dense = folded_chain(x, depth=6)
    # the first channels of each group: copies of every feature stay (importance could keep copies of one only)
    plan = plan_crop(dense, 8, pai="uniform", pretrained=False)
    plain, restored = apply_crop(dense, plan), apply_crop(dense, plan, data=x)
    y_dense, y_plain, y_restored = (run(m, held_out) for m in (dense, plain, restored))
    # without the statistics the logits hardly depend on the input any more: one class for every input
    assert spread(y_plain) < 0.01 * spread(y_dense)
    assert len(np.unique(y_plain.argmax(1))) == 1
    # with them (measured on other inputs than these) the logits vary as much as the dense model's and follow them
    # from input to input (measured: spread 0.69x, correlation 0.64 against 0.35)
    assert 0.3 < spread(y_restored) / spread(y_dense) < 3
    assert correlation(y_restored, y_dense) > 0.5
    assert correlation(y_restored, y_dense) > correlation(y_plain, y_dense) + 0.15


def test_restoring_the_means_alone_does_not_prevent_the_collapse():
    """Bias correction (each kept channel's mean put back) leaves the shrunken spread: the logits stay constant, as
    they did on the examples' MobileNetV2 at 8x (10.00%). The spread has to be restored too."""
    x, held_out = images(), images(seed=2)
    dense = folded_chain(x, depth=6)
    plan = plan_crop(dense, 8, pai="uniform", pretrained=False)
    means_only = match_statistics(dense, apply_crop(dense, plan), plan.channels, plan.keep, x, scale=False)
    y_dense, y_means = run(dense, held_out), run(means_only, held_out)
    assert spread(y_means) < 0.03 * spread(y_dense)  # measured 0.009
    assert len(np.unique(y_means.argmax(1))) == 1


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Of the two outputs' deviations from their batch means."""
    return float(np.corrcoef((a - a.mean(0)).ravel(), (b - b.mean(0)).ravel())[0, 1])


def test_every_cropped_conv_gets_the_dense_statistics_of_its_kept_channels():
    x = images()
    dense = folded_chain(x, depth=4)
    plan = plan_crop(dense, 4, pai="uniform")
    restored = apply_crop(dense, plan, data=x)
    convs = [f"conv{i}" for i in range(4)]
    before = dict(zip(convs, run_all(dense, convs, x)))
    after = dict(zip(convs, run_all(restored, convs, x)))
    for layer in plan.channels.layers:
        if layer.op != "Conv":
            continue
        kept = plan.channels.kept_features(layer.out_layout, plan.keep)
        d, r = before[layer.name][:, kept], after[layer.name]
        np.testing.assert_allclose(r.mean(axis=(0, 2, 3)), d.mean(axis=(0, 2, 3)), atol=1e-4)
        np.testing.assert_allclose(r.std(axis=(0, 2, 3)), d.std(axis=(0, 2, 3)), rtol=1e-3)


def run_all(model, names, x):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(with_outputs(model, names).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})


def test_a_conv_nothing_upstream_of_changed_is_left_exactly_as_cropped():
    x = images()
    dense = folded_chain(x, depth=3)
    plan = plan_crop(dense, 4, pai="uniform")
    plain, restored = apply_crop(dense, plan), apply_crop(dense, plan, data=x)
    inits = lambda m: {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    p, r = inits(plain), inits(restored)
    np.testing.assert_array_equal(r["conv0.weight"], p["conv0.weight"])  # reads the graph input, kept whole
    np.testing.assert_array_equal(r["conv0.bias"], p["conv0.bias"])
    assert not np.array_equal(r["conv1.weight"], p["conv1.weight"])  # reads cropped channels


@pytest.mark.parametrize("ir3", [False, True])
def test_convs_without_bias_before_batchnorm_get_one_and_the_model_stays_valid(ir3):
    """The unfolded MobileNetV2 builder: Convs without bias, BN after them, depthwise Convs, residual Adds."""
    model = mobilenet_v2()
    model = as_ir3(model) if ir3 else model
    x = np.random.default_rng(0).normal(0, 1, (16, 3, 32, 32)).astype(np.float32)
    plan = plan_crop(model, 4, pai="uniform")
    restored = apply_crop(model, plan, data=x)
    onnx.checker.check_model(restored)
    convs = [n for n in restored.graph.node if n.op_type == "Conv"]
    assert sum(len(n.input) == 3 and n.input[2] != "" for n in convs) > len(convs) // 2
    graph_inputs = {i.name for i in restored.graph.input}
    inits = {t.name for t in restored.graph.initializer}
    if ir3:
        assert inits <= graph_inputs
    assert all(name in inits for n in convs for name in n.input[1:] if name)
    y = np.concatenate([run(restored, x[i:i + 1]) for i in range(4)])  # the builder's input has batch 1
    assert np.isfinite(y).all() and spread(y) > 0
