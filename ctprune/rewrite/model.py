"""Whole-model rewrite: pruned layers -> `ai.ctprune.PatternConv` (3x3) and `ai.ctprune.SparseConv` (1x1, kxk, FC).

Protobuf surgery on a copy of the model, so names, order, metadata and every other node stay byte-for-byte what they
were. Per listed layer (weight from an initializer or a Constant node):
- the node becomes a PatternConv / SparseConv of the same name at the same place, with compact weight initializers
  (`<weight>.pattern` (K, 4); `<weight>.sparse.{values,columns,blocks}`) and the spec's attributes
  (ops/PatternConv.md, ops/SparseConv.md); the bias input is reused as it is;
- what follows it folds in where it is the output's only reader (rewrite/fusion.py): an inference BatchNormalization
  with constant parameters or a Mul / Add of per-channel constants (onnxruntime folds those into a dense Conv, not
  into an op it does not know), a residual Add
  of a same-shaped tensor (input Z; the node then sits where the Add was, since the shortcut may be computed after
  the Conv), an activation (Relu, constant Clip; for SparseConv also HardSwish, x * HardSigmoid(x), x * Sigmoid(x),
  and HardSwish written out as x * Clip(x + a, 0, d) / d);
  the fused node writes the last fused node's output name, so the graph outside is unchanged;
- a sparse layer that would run slower than onnxruntime's dense op (rewrite/sparse_cost.py), and on request a
  pattern layer whose PatternConv would not be faster (rewrite/pattern_cost.py), stays as it is, a dense op with its
  pruned weights zero (stored compactly when that is smaller), and `kept_dense` says why;
- the dense weight (and fused constants) are dropped when nothing else reads them, from the initializers and, for
  IR-3 style models, from the graph inputs too.
The model gains the `ai.ctprune` opset import (version 1) and a model-local function per op it uses, stamped with
the model's default-domain opset; where any residual was fused, the function's form with Z, and every node of that
op without a residual gets a shared one-element zero as Z. A model below opset 13 / IR 8 is upgraded first
(rewrite/upgrade.py).

Layers are keyed by node name; for graphs whose nodes have no names, a key may also be the node's output name.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import AttributeProto, helper, numpy_helper

from ctprune.errors import GraphError
from ctprune.graph.constants import ConstantTable
from ctprune.graph.edit import drop_unread, forget_value_info, taken_names, unique_name
from ctprune.graph.layers import conv_attributes
from ctprune.graph.load import default_opset
from ctprune.graph.readers import TensorReaders
from ctprune.graph.shapes import inferred_shape_table
from ctprune.graph.weightless import is_placeholder
from ctprune.graph.writeback import set_tensor
from ctprune.ops.names import DOMAIN, OP_TYPE, SPARSE_OP_TYPE, VERSION
from ctprune.ops.reference import pattern_conv_function
from ctprune.rewrite.fusion import FoldedAffine, FusedActivation, fusable_activation, fusable_affine, fusable_residual
from ctprune.rewrite.pattern_conv import CompactPatternWeights, LayerPatterns, compact_from_dense
from ctprune.rewrite.upgrade import upgraded

log = logging.getLogger(__name__)

SPARSE_OPS = ("Conv", "Gemm", "MatMul")
# A layer kept as a dense op stores only its kept weights (4-byte value + 4-byte position each) below this density.
COMPACT_HOLD_DENSITY = 0.45
Z_INPUT = {OP_TYPE: 3, SPARSE_OP_TYPE: 5}  # where each op's residual Z sits: X, W, B, Z / X, W, I, P, B, Z


def _node_lookup(graph: onnx.GraphProto) -> tuple[dict, dict]:
    """({node name: [indices]}, {first output: [indices]}), built once so finding every layer stays linear."""
    names, outputs = {}, {}
    for i, node in enumerate(graph.node):
        names.setdefault(node.name, []).append(i)
        if node.output:
            outputs.setdefault(node.output[0], []).append(i)
    return names, outputs


def _find_layer(graph: onnx.GraphProto, key: str, ops: tuple = ("Conv",), lookup: tuple | None = None) -> int:
    names, outputs = lookup or _node_lookup(graph)
    by_name = names.get(key, [])
    if len(by_name) > 1:
        raise GraphError(f"{len(by_name)} nodes are named {key!r}; the rewrite needs unique Conv names")
    if not by_name:
        by_name = [i for i in outputs.get(key, []) if graph.node[i].op_type in ops]
    if not by_name:
        raise GraphError(f"no Conv node named {key!r} (nor one writing a tensor of that name) in the main graph")
    index = by_name[0]
    node = graph.node[index]
    if node.op_type not in ops or node.domain not in ("", "ai.onnx"):
        raise GraphError(f"node {key!r} is a {node.domain or 'ai.onnx'}.{node.op_type}, not a {' or '.join(ops)}")
    return index


def _conv_geometry(node: onnx.NodeProto, where: str) -> tuple[list[int], list[int]]:
    """(strides, pads) of a Conv PatternConv can take; GraphError for what it cannot."""
    attrs = conv_attributes(node)
    if attrs.kernel_shape not in (None, (3, 3)):
        raise GraphError(f"{where}: kernel_shape {list(attrs.kernel_shape)} is not 3x3")
    if attrs.group != 1:
        raise GraphError(f"{where}: group {attrs.group} is not 1 (PatternConv is for ordinary 3x3 Convs)")
    if any(d != 1 for d in attrs.dilations):
        raise GraphError(f"{where}: dilations {list(attrs.dilations)} are not 1")
    if attrs.auto_pad not in ("NOTSET", "VALID"):
        raise GraphError(f"{where}: auto_pad {attrs.auto_pad} is not supported; export the model with explicit pads")
    strides, pads = list(attrs.strides), list(attrs.resolved_pads())
    if len(strides) != 2 or len(pads) != 4:
        raise GraphError(f"{where}: not a 2-D Conv (strides {strides}, pads {pads})")
    return strides, pads


def _fold_affine(graph, conv, compact, affine: FoldedAffine, constants: ConstantTable,
                 taken) -> tuple[CompactPatternWeights, str] | None:
    """The compact weights and the name of a new bias initializer with the per-channel affine (BatchNormalization,
    Mul / Add of constants) folded in, or None where the Conv's bias is not a constant or the shapes disagree."""
    folded = _folded_affine_bias(graph, conv, compact.weight_shape[0], affine, constants, taken)
    if folded is None:
        return None
    scale, name = folded
    weights = (compact.weights * scale[compact.kernel_filters][:, None]).astype(np.float32)
    return dataclasses.replace(compact, weights=weights), name


def _folded_affine_bias(graph, conv, out_channels: int, affine: FoldedAffine, constants: ConstantTable, taken):
    """(the affine's per-output-channel scale, the name of a new bias initializer holding the Conv's bias folded
    with it), or None where the Conv's bias is not a constant or the shapes disagree; the caller scales the
    weights."""
    scale, shift = affine.scale, affine.shift
    if scale.size == 1:
        scale = np.full(out_channels, scale.item())
    if shift.size == 1:
        shift = np.full(out_channels, shift.item())
    bias = np.zeros(out_channels)
    if len(conv.input) > 2 and conv.input[2]:
        bias = constants.value(conv.input[2])
        if bias is None:
            return None
    if scale.shape != (out_channels,) or np.size(bias) != out_channels:
        return None
    name = unique_name(f"{conv.name or conv.output[0]}.folded_bias", taken)
    graph.initializer.append(numpy_helper.from_array((bias.reshape(-1) * scale + shift).astype(np.float32), name))
    return scale, name


def _pattern_conv_node(conv, inputs, output, compact: CompactPatternWeights, strides, pads, lo, hi) -> onnx.NodeProto:
    node = onnx.NodeProto()
    node.op_type, node.domain, node.name = OP_TYPE, DOMAIN, conv.name
    node.doc_string = conv.doc_string
    node.metadata_props.extend(conv.metadata_props)
    node.input.extend(inputs)
    node.output.append(output)
    ints = dict(compact.attributes(), strides=strides, pads=pads, dilations=[1, 1])
    for name, values in ints.items():
        # explicit type: a layer with every kernel removed has empty kernel_* lists
        node.attribute.append(helper.make_attribute(name, values, attr_type=AttributeProto.INTS))
    node.attribute.append(helper.make_attribute("group", 1))
    node.attribute.append(helper.make_attribute("activation_min", float(lo)))
    node.attribute.append(helper.make_attribute("activation_max", float(hi)))
    return node


def _sparse_geometry(node: onnx.NodeProto, x_shape, where: str) -> dict:
    """strides, pads (auto_pad resolved), dilations and group of a 2-D Conv, for SparseConv."""
    attrs = conv_attributes(node)
    strides, dilations = list(attrs.strides), list(attrs.dilations)
    pads = attrs.resolved_pads(tuple(x_shape[2:]) if x_shape and len(x_shape) == 4 else None)
    if pads is None:
        raise GraphError(f"{where}: auto_pad {attrs.auto_pad} needs a static input size to be made explicit")
    pads = list(pads)
    if len(strides) != 2 or len(pads) != 4 or len(dilations) != 2:
        raise GraphError(f"{where}: not a 2-D Conv (strides {strides}, pads {pads})")
    return {"strides": strides, "pads": pads, "dilations": dilations, "group": attrs.group}


class _Rewrite:
    """The state of one rewrite: the graph being edited, names taken, what each tensor is read by, what goes."""

    def __init__(self, model: onnx.ModelProto, held: dict | None = None):
        self.model = model
        self.graph = model.graph
        self.held = held or {}  # values of placeholder initializers (write_back's hold)
        # Constants, names and readers are indexed once, before any node changes (the rewrite asks only about
        # tensors of the original graph); Identity aliases are not followed: a layer folds what it reads directly.
        self.constants = ConstantTable(self.graph, aliases=False, held=self.held)
        self.taken = taken_names(self.graph)
        self.reads = TensorReaders(self.graph)
        # Shapes decide which residual Adds fuse, resolve SAME pads and type ctprune's outputs (finish()); inferred
        # once, before any node changes.
        self.shapes = inferred_shape_table(model, symbolic=True)
        self.fused_away: set[int] = set()
        self.internal: set[str] = set()  # tensors fusion made internal: their value_info goes once, in finish()
        self.maybe_unread: set[str] = set()
        self.with_residual: set[str] = set()  # op types that took a Z somewhere
        self.prelude: list[onnx.NodeProto] = []  # constant-only nodes that go first (dense weights rebuilt at load)

    def constant(self, name: str):
        return self.constants.value(name)

    def tail(self, index: int, output: str, gates: bool) -> tuple[str, int, str | None, FusedActivation | None]:
        """Fuse the residual Add and the activation after `output`: (output, place, residual, activation)."""
        place, residual = index, None
        found = fusable_residual(self.graph, output, self.reads, self.shapes)
        if found is not None:
            place, residual = found
            self.fused_away.add(index)
            self.internal.add(output)
            output = self.graph.node[place].output[0]
        act = fusable_activation(self.graph, output, self.reads, self.constants, gates=gates)
        if act is not None:
            for i in act.nodes:
                self.fused_away.add(i)
                self.maybe_unread.update(name for name in self.graph.node[i].input[1:] if name)
            self.internal.add(output)
            output = act.output
        return output, place, residual, act

    def pattern(self, key: str, index: int, patterns: LayerPatterns, require_masked: bool,
                check_speed: bool = False) -> str | None:
        """Rewrite one pattern layer; returns why it stays dense (check_speed: PatternConv would not be faster),
        or None when it became a PatternConv."""
        from ctprune.rewrite.pattern_cost import pattern_beats_dense, plane_pixels
        from ctprune.rewrite.sparse_cost import MARGIN

        graph = self.graph
        conv = graph.node[index]
        where = f"Conv node {key!r}"
        strides, pads = _conv_geometry(conv, where)
        weight = self.constant(conv.input[1])
        if weight is None:
            raise GraphError(f"{where}: its weight {conv.input[1]!r} is not an initializer or a Constant")
        if weight.dtype != np.float32:
            raise GraphError(f"{where}: PatternConv takes float32 weights, {conv.input[1]!r} is {weight.dtype}")
        compact = compact_from_dense(weight, patterns, require_masked=require_masked, where=where)
        if check_speed and require_masked:  # the weight is zero outside the kept taps: the dense Conv keeps it as is
            pixels = plane_pixels(self.shapes.get(conv.output[0]))
            faster, density, speedup = pattern_beats_dense(compact, pixels=pixels)
            if not faster:
                held = density < COMPACT_HOLD_DENSITY and self._hold_compactly(conv, weight, patterns.mask() != 0)
                return (f"PatternConv would not be {MARGIN:g}x faster than the dense Conv at density {density:.3f} "
                        f"(estimated {speedup:.2f}x): kept dense"
                        + (" (kept weights stored compactly, rebuilt when the session loads)" if held else " (zeros held)"))
        output = conv.output[0]
        bias = conv.input[2] if len(conv.input) > 2 else ""
        affine = fusable_affine(graph, output, self.reads, self.constants)
        folded = _fold_affine(graph, conv, compact, affine, self.constants, self.taken) if affine is not None else None
        if folded is not None:
            compact, bias = folded
            output = self._fold_away(affine, conv, output)
        output, place, residual, act = self.tail(index, output, gates=False)
        lo, hi = (act.lo, act.hi) if act is not None else (float("-inf"), float("inf"))
        weight_name = unique_name(f"{conv.input[1]}.pattern", self.taken)
        graph.initializer.append(numpy_helper.from_array(compact.weights, weight_name))
        inputs = [conv.input[0], weight_name] + ([bias, residual] if residual else [bias] if bias else [])
        if residual:
            self.with_residual.add(OP_TYPE)
        self.maybe_unread.add(conv.input[1])
        # `conv` is a view into graph.node: build the new node before writing it over `place`
        graph.node[place].CopyFrom(_pattern_conv_node(conv, inputs, output, compact, strides, pads, lo, hi))
        log.debug("%s -> PatternConv: %d of %d kernels kept", key, len(compact.weights), weight.shape[0] * weight.shape[1])
        return None

    def _fold_away(self, affine: FoldedAffine, conv, output: str) -> str:
        self.maybe_unread.update(name for name in conv.input[2:] if name)
        for index in affine.nodes:
            node = self.graph.node[index]
            self.fused_away.add(index)
            self.maybe_unread.update(name for name in node.input if name and name != output)
            self.internal.add(output)
            output = node.output[0]
        return output

    def sparse(self, key: str, index: int, layer, require_masked: bool, threads: int,
               check_speed: bool = True) -> str | None:
        """Rewrite one sparse layer; returns why it stays dense, or None when it became a SparseConv.
        check_speed=False: SparseConv whatever the cost model says (a depthwise Conv keeping every weight)."""
        from ctprune.rewrite.sparse_conv import Activation, compact_sparse_from_dense, sparse_conv_node
        from ctprune.rewrite.sparse_cost import sparse_beats_dense

        graph = self.graph
        node = graph.node[index]
        where = f"{node.op_type} node {key!r}"
        weight = self.constant(node.input[1])
        if weight is None:
            raise GraphError(f"{where}: its weight {node.input[1]!r} is not an initializer or a Constant")
        if weight.dtype != np.float32:
            raise GraphError(f"{where}: SparseConv takes float32 weights, {node.input[1]!r} is {weight.dtype}")
        fc = node.op_type != "Conv"
        mask = layer.kept_mask()
        stored_weight, stored_mask = weight, mask
        if fc and layer.transposed:  # stored (I, O): SparseConv's FC weight is (O, I)
            weight, mask = weight.T, mask.T
        density = _density(mask)
        x_shape = self.shapes.get(node.input[0])
        geometry = {} if fc else _sparse_geometry(node, x_shape, where)
        hw = tuple(x_shape[2:]) if (not fc and x_shape and len(x_shape) == 4) else None
        stride = geometry.get("strides", [1, 1])[0]
        if check_speed and not sparse_beats_dense("fc" if fc else "conv", tuple(weight.shape), hw, stride, density,
                                                  layer.block, threads=threads):
            held = density < COMPACT_HOLD_DENSITY and self._hold_compactly(node, stored_weight, stored_mask)
            return (f"SparseConv would be slower than the dense {node.op_type} at density {density:.3f}: kept dense"
                    + (" (kept weights stored compactly, rebuilt when the session loads)" if held else " (zeros held)"))
        output = node.output[0]
        bias = ""
        if fc and len(node.input) > 2 and node.input[2]:
            bias = self._fc_bias(node, weight.shape[0])
        elif not fc and len(node.input) > 2:
            bias = node.input[2]
        folded = None
        if not fc:
            affine = fusable_affine(graph, output, self.reads, self.constants)
            folded = _fold_affine_dense(self, node, weight, affine) if affine is not None else None
            if folded is not None:
                weight, bias = folded
                output = self._fold_away(affine, node, output)
        output, place, residual, act = self.tail(index, output, gates=True)
        activation = Activation()
        if act is not None:
            activation = {"clip": lambda a: Activation.clip(a.lo, a.hi),
                          "hardsigmoid_mul": lambda a: Activation.hard_sigmoid_mul(a.alpha, a.beta),
                          "sigmoid_mul": lambda a: Activation.silu()}[act.kind](act)
        compact = compact_sparse_from_dense(weight * mask if folded is not None else weight, layer.block,
                                            require_masked=require_masked, group=geometry.get("group", 1),
                                            mask=mask, where=where)
        prefix = unique_name(f"{node.input[1]}.sparse", self.taken)
        graph.initializer.extend(compact.initializers(prefix))
        if residual:
            self.with_residual.add(SPARSE_OP_TYPE)
        self.maybe_unread.add(node.input[1])
        kw = {k: v for k, v in geometry.items() if k != "group"}
        new = sparse_conv_node(compact, node.input[0], output, prefix, name=node.name, bias=bias,
                               residual=residual or "", activation=activation, **kw)
        new.doc_string = node.doc_string
        new.metadata_props.extend(node.metadata_props)
        graph.node[place].CopyFrom(new)
        log.debug("%s -> SparseConv: density %.3f", key, density)
        return None

    def _hold_compactly(self, node, weight: np.ndarray, mask: np.ndarray) -> bool:
        """A layer that stays a dense op keeps only its kept weights in the file: values and int32 flat positions,
        scattered into zeros by standard ops with constant inputs, which onnxruntime folds into the dense weight
        when the session loads (the op then runs as fast as before). The caller holds it so only below
        COMPACT_HOLD_DENSITY, where it is smaller than the weight; int32 positions cap the weight at 2**31."""
        if weight.size >= 2**31:
            return False
        name = node.input[1]
        positions = np.flatnonzero(mask.reshape(-1)).astype(np.int32)
        values = weight.reshape(-1)[positions].astype(np.float32)
        tag = unique_name(f"{name}.kept", self.taken)
        inits = {f"{tag}.values": values, f"{tag}.positions": positions,
                 f"{tag}.size": np.array([weight.size], np.int64), f"{tag}.shape": np.array(weight.shape, np.int64)}
        for init_name, value in inits.items():
            self.taken.add(init_name)
            self.graph.initializer.append(numpy_helper.from_array(value, init_name))
        zeros, flat, rebuilt = (unique_name(f"{tag}.{part}", self.taken) for part in ("zeros", "flat", "dense"))
        self.prelude += [
            helper.make_node("ConstantOfShape", [f"{tag}.size"], [zeros], name=zeros,
                             value=numpy_helper.from_array(np.zeros(1, np.float32))),
            helper.make_node("ScatterElements", [zeros, f"{tag}.positions", f"{tag}.values"], [flat], name=flat, axis=0),
            helper.make_node("Reshape", [flat, f"{tag}.shape"], [rebuilt], name=rebuilt),
        ]
        node.input[1] = rebuilt
        self.maybe_unread.add(name)
        return True

    def _fc_bias(self, node, out_features: int) -> str:
        """A Gemm's C as the (O,) bias SparseConv reads (a (1, O) C is reshaped into a new initializer)."""
        value = self.constant(node.input[2])
        if value is not None and value.shape == (out_features,):
            return node.input[2]
        name = unique_name(f"{node.input[2]}.vector", self.taken)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32).reshape(-1), name))
        self.maybe_unread.add(node.input[2])
        return name

    def finish(self) -> None:
        graph = self.graph
        nodes = self.prelude + [node for i, node in enumerate(graph.node) if i not in self.fused_away]
        del graph.node[:]
        graph.node.extend(nodes)
        forget_value_info(graph, self.internal)
        self._type_own_outputs()
        drop_unread(graph, self.maybe_unread)
        for tensor in graph.initializer:  # held weights still read (layers kept dense) go in now
            if tensor.name in self.held and is_placeholder(tensor):
                set_tensor(tensor, np.asarray(self.held[tensor.name]), tensor.name)
        used = {n.op_type for n in graph.node if n.domain == DOMAIN}
        for op in self.with_residual:
            _give_every_node_a_residual(graph, unique_name(f"ctprune.zero_residual.{op}", self.taken), op)
        for op in sorted(used):
            _add_function(self.model, op, residual=op in self.with_residual)


    def _type_own_outputs(self) -> None:
        """Declare the type of each ctprune op's output (the shape the replaced node's output had): onnx's shape
        inference does not see through their functions, so without it every tensor after the first one is
        untyped for any tool that reads the model (ctprune inspect's MACs among them)."""
        graph = self.graph
        typed = {v.name for v in graph.value_info} | {o.name for o in graph.output}
        for node in (n for n in graph.node if n.domain == DOMAIN):
            dims = self.shapes.get(node.output[0])
            if node.output[0] not in typed and dims is not None:
                graph.value_info.append(helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, dims))


def _density(mask: np.ndarray) -> float:
    """Kept fraction of a bool mask, as the mean of its 0/1 float32 form reads (float32-rounded), without that form."""
    return float(np.float32(int(np.count_nonzero(mask)) / mask.size))


def _fold_affine_dense(rewrite: _Rewrite, conv, weight: np.ndarray, affine: FoldedAffine):
    """(weight, new bias name) with the per-channel affine folded into a dense Conv weight, or None."""
    folded = _folded_affine_bias(rewrite.graph, conv, weight.shape[0], affine, rewrite.constants, rewrite.taken)
    if folded is None:
        return None
    scale, name = folded
    return (weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))).astype(np.float32), name


def _depthwise_as_sparse(rewrite: _Rewrite, done: dict, threads: int) -> None:
    from ctprune.rewrite import depthwise

    graph = rewrite.graph
    graph_inputs = {i.name for i in graph.input}
    shapes = {}  # candidate index -> its weight's shape
    for i, node in enumerate(graph.node):
        if i in rewrite.fused_away or node.op_type != "Conv" or len(node.input) < 2:
            continue
        weight = rewrite.constant(node.input[1])
        x_shape, y_shape = rewrite.shapes.get(node.input[0]), rewrite.shapes.get(node.output[0])
        if (weight is not None and weight.dtype == np.float32
                and depthwise.runs_on_depthwise_path(node, weight.shape, x_shape)
                and depthwise.pays_to_move(y_shape, node.input[1] in graph_inputs, weight.shape[2:])):
            shapes[i] = tuple(int(d) for d in weight.shape)
    for i in depthwise.beside_ctprune_ops(graph, rewrite.fused_away, list(shapes)):
        node = graph.node[i]
        key = node.name or node.output[0]
        rewrite.sparse(key, i, depthwise.AllWeightsKept(shapes[i]), require_masked=True, threads=threads,
                       check_speed=False)
        done[key] = depthwise.REASON


def _give_every_node_a_residual(graph: onnx.GraphProto, zero_name: str, op_type: str) -> None:
    """Every node of `op_type` without a Z reads a shared one-element zero (the function's residual form needs one).
    None when every node has its own Z (ResNet shortcuts whose residual Add fused into them): onnxruntime would
    warn of an initializer nothing reads."""
    z = Z_INPUT[op_type]
    without = [n for n in graph.node if n.op_type == op_type and n.domain == DOMAIN and len(n.input) <= z]
    if not without:
        return
    graph.initializer.append(numpy_helper.from_array(np.zeros(1, dtype=np.float32), zero_name))
    for node in without:
        node.input.extend([""] * (z - len(node.input)) + [zero_name])


def _add_function(model: onnx.ModelProto, op_type: str, residual: bool = False) -> None:
    for entry in model.opset_import:
        if entry.domain == DOMAIN and entry.version != VERSION:
            raise GraphError(f"the model already imports {DOMAIN} version {entry.version}; this ctprune writes {VERSION}")
    if not any(entry.domain == DOMAIN for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, VERSION))
    keep = [f for f in model.functions if not (f.domain == DOMAIN and f.name == op_type)]
    del model.functions[:]
    model.functions.extend(keep)
    if op_type == OP_TYPE:
        model.functions.append(pattern_conv_function(default_opset(model), residual=residual))
    else:
        from ctprune.rewrite.sparse_conv import sparse_conv_function

        model.functions.append(sparse_conv_function(default_opset(model), residual=residual))


def rewrite_model(
    model: onnx.ModelProto, layers: Mapping[str, LayerPatterns], *, sparse: Mapping | None = None,
    require_masked: bool = True, kept_dense: dict | None = None, threads: int = 1, in_place: bool = False,
    held: dict | None = None, check_pattern_speed: bool = False, depthwise: dict | None = None,
) -> onnx.ModelProto:
    """A new model where each Conv named in `layers` is a PatternConv and each layer named in `sparse`
    ({name: pruning.plan.SparseLayer}) a SparseConv unless it would be slower than dense (see the module doc);
    `model` is not modified. `kept_dense`, when given, receives {name: why} for the layers left dense;
    `threads`: the intra-op threads the sparse speed decision assumes. `check_pattern_speed`: a pattern layer whose
    PatternConv would not be faster than the dense Conv (rewrite/pattern_cost.py) stays a dense Conv holding its
    zeros, as a slower sparse layer always does (with `require_masked` only: the weight is the masked one).

    `require_masked`: weights outside a layer's kept set must be zero (GraphError otherwise); False drops them.
    `in_place`: edit `model` itself where it needs no opset upgrade (no copy of its weights); the dense weights it
    drops then stay in its protobuf arena until it is freed, so keep a copy of the result, not the model.
    `held`: {name: array} for initializers `model` holds as placeholders (write_back's `hold`): pruned weights are
    read from there, and only those still read at the end (layers kept dense) are written into the model.
    `depthwise`, when given: depthwise Convs beside the ctprune ops this rewrite makes become SparseConvs keeping
    every weight (rewrite/depthwise.py), and the dict receives {name: why}.
    """
    sparse = dict(sparse or {})
    model = upgraded(model, in_place=in_place)
    graph = model.graph
    lookup = _node_lookup(graph)
    indices = {key: _find_layer(graph, key, lookup=lookup) for key in layers}
    indices.update({key: _find_layer(graph, key, SPARSE_OPS, lookup=lookup) for key in sparse})
    if len(set(indices.values())) != len(indices):
        raise GraphError("two keys of the layer map name the same node")
    rewrite = _Rewrite(model, held)
    for key, index in sorted(indices.items(), key=lambda item: item[1]):
        if key in layers:
            why = rewrite.pattern(key, index, layers[key], require_masked, check_pattern_speed)
        else:
            why = rewrite.sparse(key, index, sparse[key], require_masked, threads)
        if why is not None and kept_dense is not None:
            kept_dense[key] = why
    if depthwise is not None:
        _depthwise_as_sparse(rewrite, depthwise, threads)
    rewrite.finish()
    return model
