"""Small ONNX nets for the PreCropping tests, built with onnx.helper (no exporter, no downloads).

ResNet-style (residual Add, 1x1 downsample), MobileNetV2-style (depthwise, inverted residuals, Clip), DenseNet-style
(Concat), squeeze-excite (per-channel Mul), VGG-style (Conv → Flatten → Gemm → Dropout → Gemm). All keep
BatchNormalization unfolded. The tests at the bottom only check that the builders make valid models.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class NetBuilder:
    """Appends nodes and random initializers; names are unique and readable."""

    def __init__(self, seed: int = 0, in_channels: int = 3, size: int = 32):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.count = [], [], {}
        self.channels = {"input": in_channels}
        self.in_shape = [1, in_channels, size, size]

    def name(self, kind: str) -> str:
        self.count[kind] = self.count.get(kind, 0) + 1
        return f"{kind}{self.count[kind]}"

    def const(self, base: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value.astype(np.float32), base))
        return base

    def conv(self, x, c_out, k=3, stride=1, group=1, bias=True):
        n = self.name("conv")
        c_in = self.channels[x]
        fan = c_in // group * k * k
        w = self.const(f"{n}.weight", self.rng.normal(0, np.sqrt(2 / fan), (c_out, c_in // group, k, k)))
        inputs = [x, w] + ([self.const(f"{n}.bias", self.rng.normal(0, 0.1, c_out))] if bias else [])
        self.nodes.append(helper.make_node("Conv", inputs, [n], name=n, kernel_shape=[k, k], strides=[stride] * 2,
                                           pads=[k // 2] * 4, group=group))
        self.channels[n] = c_out
        return n

    def bn(self, x):
        n, c = self.name("bn"), self.channels[x]
        p = [self.const(f"{n}.{s}", v) for s, v in (
            ("scale", self.rng.uniform(0.5, 1.5, c)), ("bias", self.rng.normal(0, 0.1, c)),
            ("mean", self.rng.normal(0, 0.1, c)), ("var", self.rng.uniform(0.5, 1.5, c)))]
        self.nodes.append(helper.make_node("BatchNormalization", [x] + p, [n], name=n))
        self.channels[n] = c
        return n

    def op(self, op_type, inputs, **attrs):
        n = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [n], name=n, **attrs))
        self.channels[n] = self.channels.get(inputs[0])
        return n

    def relu(self, x):
        return self.op("Relu", [x])

    def relu6(self, x):
        lo = self.const(self.name("zero"), np.array(0.0))
        hi = self.const(self.name("six"), np.array(6.0))
        return self.op("Clip", [x, lo, hi])

    def cbr(self, x, c_out, k=3, stride=1, group=1):
        return self.relu(self.bn(self.conv(x, c_out, k, stride, group, bias=False)))

    def head(self, x, classes=10):
        pooled = self.op("GlobalAveragePool", [x])
        flat = self.op("Flatten", [pooled], axis=1)
        c = self.channels[x]
        w = self.const(self.name("fc") + ".weight", self.rng.normal(0, 0.1, (classes, c)))
        b = self.const(w.replace("weight", "bias"), self.rng.normal(0, 0.1, classes))
        self.nodes.append(helper.make_node("Gemm", [flat, w, b], ["logits"], name="fc", transB=1))
        return "logits"

    def model(self, out="logits", out_shape=(1, 10), ir_version=8, opset=OPSET) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "precrop_test",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, self.in_shape)],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, list(out_shape))], self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = ir_version
        onnx.checker.check_model(m)
        return m


def resnet(width=16, blocks=(2, 2, 2), seed=0, size=32) -> onnx.ModelProto:
    b = NetBuilder(seed, size=size)
    x = b.cbr("input", width)
    c = width
    for stage, n in enumerate(blocks):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            c_out = width * 2 ** stage
            y = b.cbr(x, c_out, stride=stride)
            y = b.bn(b.conv(y, c_out, bias=False))
            short = x if stride == 1 and c == c_out else b.bn(b.conv(x, c_out, k=1, stride=stride, bias=False))
            x = b.relu(b.op("Add", [y, short]))
            c = c_out
    b.head(x)
    return b.model()


def mobilenet_v2(seed=0, size=32, width=16) -> onnx.ModelProto:
    b = NetBuilder(seed, size=size)
    x = b.relu6(b.bn(b.conv("input", width * 2, stride=2, bias=False)))
    c = width * 2
    for t, c_out, n, s in [(1, width, 1, 1), (6, width * 3 // 2, 2, 2), (6, width * 2, 3, 2), (6, width * 4, 2, 1)]:
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = c * t
            y = b.relu6(b.bn(b.conv(x, hidden, k=1, bias=False))) if t != 1 else x
            y = b.relu6(b.bn(b.conv(y, hidden, stride=stride, group=hidden, bias=False)))
            y = b.bn(b.conv(y, c_out, k=1, bias=False))
            x = b.op("Add", [x, y]) if stride == 1 and c == c_out else y
            c = c_out
    x = b.relu6(b.bn(b.conv(x, width * 8, k=1, bias=False)))
    b.head(x)
    return b.model()


def densenet(seed=0, size=32, growth=16, layers=(3, 3)) -> onnx.ModelProto:
    b = NetBuilder(seed, size=size)
    x = b.cbr("input", 2 * growth)
    for stage, n in enumerate(layers):
        for _ in range(n):
            y = b.conv(b.relu(b.bn(x)), 4 * growth, k=1, bias=False)
            y = b.conv(b.relu(b.bn(y)), growth, bias=False)
            cat = b.op("Concat", [x, y], axis=1)
            b.channels[cat] = b.channels[x] + growth
            x = cat
        if stage < len(layers) - 1:
            x = b.conv(b.relu(b.bn(x)), b.channels[x] // 2, k=1, bias=False)
            x = b.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.relu(b.bn(x))
    b.head(x)
    return b.model()


def se_net(seed=0, size=32, width=32, blocks=3) -> onnx.ModelProto:
    b = NetBuilder(seed, size=size)
    x = b.cbr("input", width)
    for i in range(blocks):
        c = width * 2 ** (i // 2)
        y = b.cbr(x, c, stride=2 if i % 2 else 1)
        y = b.bn(b.conv(y, c, bias=False))
        s = b.op("GlobalAveragePool", [y])
        s = b.relu(b.conv(s, max(c // 4, 8), k=1))
        s = b.op("Sigmoid", [b.conv(s, c, k=1)])
        y = b.op("Mul", [y, s])
        short = x if b.channels[x] == c and not i % 2 else b.bn(b.conv(x, c, k=1, stride=2 if i % 2 else 1, bias=False))
        x = b.relu(b.op("Add", [y, short]))
    b.head(x)
    return b.model()


def vgg(seed=0, size=32, widths=(16, 32, 32)) -> onnx.ModelProto:
    b = NetBuilder(seed, size=size)
    x = "input"
    for w in widths:
        x = b.op("MaxPool", [b.cbr(x, w)], kernel_shape=[2, 2], strides=[2, 2])
    flat = b.op("Flatten", [x], axis=1)
    feats = widths[-1] * (size // 2 ** len(widths)) ** 2
    w1 = b.const("fc1.weight", b.rng.normal(0, 0.05, (64, feats)))
    h = b.op("Gemm", [flat, w1, b.const("fc1.bias", b.rng.normal(0, 0.1, 64))], transB=1)
    h = b.op("Dropout", [b.relu(h)])
    w2 = b.const("fc2.weight", b.rng.normal(0, 0.1, (64, 10)))  # transB=0 layout on purpose
    b.nodes.append(helper.make_node("Gemm", [h, w2, b.const("fc2.bias", np.zeros(10))], ["logits"], name="fc2"))
    return b.model()


def as_ir3(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same net as an IR-version-3, opset-9 model: every initializer listed as a graph input too."""
    b = onnx.ModelProto()
    b.CopyFrom(model)
    for node in b.graph.node:
        if node.op_type == "Clip":  # opset 9 Clip takes min/max attributes
            del node.input[1:]
            node.attribute.extend([helper.make_attribute("min", 0.0), helper.make_attribute("max", 6.0)])
    for t in b.graph.initializer:
        b.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del b.opset_import[:]
    b.opset_import.append(helper.make_opsetid("", 9))
    b.ir_version = 3
    return b


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_builders_make_valid_running_models():
    x = np.random.default_rng(1).normal(size=(1, 3, 32, 32)).astype(np.float32)
    for build in (resnet, mobilenet_v2, densenet, se_net, vgg):
        m = build()
        y = run(m, x)
        assert y.shape == (1, 10) and np.all(np.isfinite(y)), build.__name__
    y3 = run(as_ir3(resnet()), x)
    assert np.allclose(y3, run(resnet(), x), atol=1e-5)
