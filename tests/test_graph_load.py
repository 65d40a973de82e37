"""load_model and the unsupported-op check: every user mistake is one readable ctprune error."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ctprune.errors import ModelLoadError, UnsupportedOpsError
from ctprune.graph import check_supported, lift, load_model


def small_model(opset: int = 13) -> onnx.ModelProto:
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["y"], ["z"], name="relu")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_loads_path_bytes_and_proto(tmp_path):
    model = small_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    for source in (path, str(path), path.read_bytes(), model):
        loaded = load_model(source)
        assert [n.name for n in loaded.graph.node] == ["conv", "relu"]
    assert load_model(model) is not model  # a copy: the caller's proto is never touched


def test_external_data(tmp_path):
    model = small_model()
    path = tmp_path / "ext.onnx"
    onnx.save(small_model(), path, save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin",
              size_threshold=0)
    assert (tmp_path / "w.bin").exists()
    loaded = load_model(path)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(loaded.graph.initializer[0]),
                                  onnx.numpy_helper.to_array(model.graph.initializer[0]))
    assert "w" in lift(loaded).onnx_parameters()


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file") as e:
        load_model(tmp_path / "nope.onnx")
    assert "nope.onnx" in str(e.value)


def test_not_onnx(tmp_path):
    path = tmp_path / "photo.onnx"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(ModelLoadError, match="not an ONNX model") as e:
        load_model(path)
    assert "photo.onnx" in str(e.value)
    with pytest.raises(ModelLoadError, match="not an ONNX model"):
        load_model(b"hello, I am a text file\n")


def test_truncated(tmp_path):
    data = small_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ModelLoadError) as e:
        load_model(path)
    assert "cut.onnx" in str(e.value)


def test_invalid_model_is_rejected_by_checker():
    model = small_model()
    model.graph.node[1].input[0] = "does_not_exist"
    with pytest.raises(ModelLoadError, match="checker"):
        load_model(model)


def test_two_unsupported_ops_named_with_their_nodes():
    model = small_model()
    model.graph.node.extend([
        helper.make_node("NonMaxSuppression", ["z"], ["nms"], name="nms_node"),
        helper.make_node("TopK", ["z", "k"], ["v", "i"], name="topk_a"),
        helper.make_node("TopK", ["z", "k"], ["v2", "i2"], name="topk_b"),
    ])
    with pytest.raises(UnsupportedOpsError) as e:
        check_supported(model)
    msg = str(e.value)
    for word in ("NonMaxSuppression", "nms_node", "TopK", "topk_a", "topk_b"):
        assert word in msg
    assert e.value.unsupported == {"NonMaxSuppression": ["nms_node"], "TopK": ["topk_a", "topk_b"]}
    with pytest.raises(UnsupportedOpsError):  # lift refuses before doing any work
        lift(model)


def test_opset_out_of_range():
    model = small_model(opset=13)
    model.opset_import[0].version = 3
    with pytest.raises(ModelLoadError, match="opset 3"):
        load_model(model.SerializeToString())


@pytest.mark.parametrize("problem", ["missing", "not_onnx", "truncated", "unsupported"])
def test_cli_reports_one_message_no_traceback(problem, tmp_path, capsys):
    from ctprune.cli import run

    path = tmp_path / "m.onnx"
    if problem == "not_onnx":
        path.write_bytes(b"PK\x03\x04 definitely a zip file, not a model" * 10)
    elif problem == "truncated":
        data = small_model().SerializeToString()
        path.write_bytes(data[: len(data) // 2])
    elif problem == "unsupported":
        model = small_model()
        model.graph.node.append(helper.make_node("NonZero", ["z"], ["nz"], name="nz_node"))
        model.graph.node.append(helper.make_node("Einsum", ["z", "z"], ["e"], name="einsum_node", equation="i,i"))
        onnx.save(model, path)
    code = run(["inspect", str(path)]) if problem != "unsupported" else run([str(path), "--ratio", "8", "--epochs", "0"])
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert "m.onnx" in err or problem == "unsupported"
    if problem == "unsupported":
        assert "NonZero" in err and "nz_node" in err and "Einsum" in err and "einsum_node" in err
