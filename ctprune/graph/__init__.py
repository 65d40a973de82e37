"""ONNX in, trainable torch module, ONNX out.

    original = load_model("model.onnx")         # the user's proto, kept untouched
    tg = lift(original)                          # nn.Module interpreting the graph; weights are nn.Parameters
    ...train tg...
    trained = write_back(original, tg)           # the original graph with the trained tensors
    layers = conv_layers(original)               # per-Conv facts: shapes, MACs, consumers
"""

from ctprune.graph.layers import ConvLayer, FCLayer, conv_layers, fc_layers
from ctprune.graph.lift import TrainableGraph, check_supported, lift
from ctprune.graph.load import load_model
from ctprune.graph.normalize import normalize
from ctprune.graph.writeback import write_back

__all__ = [
    "load_model",
    "normalize",
    "lift",
    "TrainableGraph",
    "check_supported",
    "write_back",
    "conv_layers",
    "ConvLayer",
    "fc_layers",
    "FCLayer",
]
