"""ctprune inspect: per-layer numbers at the model's input shape."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import light_model_path
from ctprune.graph import conv_layers, load_model
from ctprune.report.inspect import layer_table, render_table


def test_light_vgg19_totals():
    path = light_model_path("vgg19")
    if not path.exists():
        pytest.skip("light_vgg19 is not in this onnx wheel")
    rows, totals = layer_table(load_model(path))
    assert totals["params"] == 143_667_240
    assert abs(totals["macs"] - 19.6e9) / 19.6e9 < 0.01
    # 15 3x3 Convs by pattern (the first stays dense), the two hidden FC layers sparse, the classifier dense
    assert totals["layers"] == 19 and totals["prunable_layers"] == 17
    assert [r.op for r in rows].count("Gemm") == 3
    assert [r.form for r in rows] == ["dense"] + ["pattern"] * 15 + ["sparse", "sparse", "dense"]
    assert "first Conv" in rows[0].why and "classifier head" in rows[-1].why
    assert layer_table(load_model(path), method="pattern")[1]["prunable_layers"] == 15
    text = render_table(rows, totals)
    assert "143,667,240" in text and "19.63 G MACs" in text


def _model(batch="N"):
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "wd"),
        numpy_helper.from_array(rng.standard_normal((16, 8, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal((10, 16)).astype(np.float32), "fc"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Clip", ["c1"], ["k1"], name="clip1"),
        helper.make_node("Conv", ["r1", "wd"], ["c2"], name="dw", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Conv", ["c2", "w2"], ["c3"], name="pw"),
        helper.make_node("GlobalAveragePool", ["c3"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10]),
                               helper.make_tensor_value_info("k1", TensorProto.FLOAT, [batch, 8, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_conv_layers_and_rows():
    model = _model()
    layers = conv_layers(model)
    assert [l.node_name for l in layers] == ["conv1", "dw", "pw"]
    c1, dw, pw = layers
    assert (c1.in_channels, c1.out_channels, c1.kernel_shape, c1.strides, c1.pads) == (3, 8, (3, 3), (2, 2), (1, 1, 1, 1))
    assert c1.output_shape == (8, 8, 8) and c1.input_shape == (3, 16, 16)
    assert c1.macs == 8 * 8 * 8 * 3 * 9 and c1.bias_name == "b1" and c1.is_pattern_prunable
    assert sorted(c1.consumers) == ["clip1", "relu1"]
    assert dw.group == 8 and dw.in_channels == 8 and not dw.is_pattern_prunable and dw.macs == 8 * 64 * 9
    assert pw.macs == 16 * 64 * 8 and pw.consumers == ["gap"]
    # an explicit input shape changes the per-sample numbers
    assert conv_layers(model, input_shape=(None, 3, 32, 32))[0].macs == 4 * c1.macs

    rows, totals = layer_table(model)
    assert [r.name for r in rows] == ["conv1", "dw", "pw", "fc"]
    assert totals["params"] == 8 * 27 + 8 + 72 + 128 + 160
    assert totals["macs"] == c1.macs + dw.macs + pw.macs + 160
    assert totals["unsupported"] == {}
    # auto: the first Conv dense, the depthwise one dense (PreCropping's), the 1x1 sparse, the classifier dense
    assert [r.form for r in rows] == ["dense", "dense", "sparse", "dense"]
    assert "depthwise" in rows[1].why and rows[2].why == ""
    assert [r.form for r in layer_table(model, prune_head=True)[0]] == ["dense", "dense", "sparse", "sparse"]


def test_cli_inspect(tmp_path):
    from ctprune.cli import main

    path = tmp_path / "m.onnx"
    onnx.save(_model(), path)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "conv1" in result.output and "total: 4 layers" in result.output


def test_inspect_lists_unsupported_ops():
    model = _model()
    model.graph.node.append(helper.make_node("TopK", ["y", "kk"], ["v", "i"], name="topk"))
    rows, totals = layer_table(model)
    assert totals["unsupported"] == {"TopK": ["topk"]}
    assert "TopK" in render_table(rows, totals)


@pytest.mark.parametrize("index", [
    dict(filter_runs=[0, 2, 1, 1, 2, 1, 3, 1], kernel_codes=[0, 1, 0, 2, 1]),
    dict(kernel_filters=[0, 0, 1, 2, 3], kernel_channels=[0, 1, 0, 2, 1], kernel_patterns=[0] * 5),  # older models
])
def test_pattern_conv_rows(index):
    """A pruned model's PatternConv nodes are layers of the table (kept kernels x 4 taps), not unsupported ops."""
    model = _model()
    node = model.graph.node[0]  # conv1: 8 filters x 3 channels, 3x3, stride 2, pads 1
    kept = 5
    model.graph.initializer.append(numpy_helper.from_array(np.ones((kept, 4), np.float32), "w1c"))
    pattern = helper.make_node(
        "PatternConv", ["x", "w1c", "b1"], ["c1"], name="conv1", domain="ai.ctprune",
        weight_shape=[8, 3, 3, 3], patterns=[0, 1, 3, 4], **index, strides=[2, 2], pads=[1, 1, 1, 1],
    )
    model.graph.node.remove(node)
    model.graph.node.insert(0, pattern)
    model.opset_import.append(helper.make_opsetid("ai.ctprune", 1))
    rows, totals = layer_table(model)
    row = rows[0]
    assert (row.name, row.op, row.in_channels, row.out_channels) == ("conv1", "PatternConv", 3, 8)
    assert row.params == kept * 4 + 8 and row.macs == kept * 4 * 8 * 8
    assert totals["unsupported"] == {}
