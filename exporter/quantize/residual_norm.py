"""Residual Add + RMSNorm as one `com.microsoft.SkipSimplifiedLayerNormalization`.

Every decoder block adds its attention and MLP outputs to the residual stream and normalizes the sum next:
two nodes per step onnxruntime runs apart (its own SkipLayerNorm fusion only takes LayerNormalization).
SkipSimplifiedLayerNormalization computes the sum and the RMSNorm in one pass and hands the sum on as its
fourth output (the next residual Add reads it), as onnxruntime-genai's graphs do. Run on the final graph after
quantization: the INT8 SmoothQuant pass reads the norm's weight Mul, which this node hides.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporter.export.graph_edits import remove_unused_nodes

FLOAT = onnx.TensorProto.FLOAT


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.producer = {out: node for node in model.graph.node for out in node.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.inits = {tensor.name: tensor for tensor in model.graph.initializer}
        self.outputs = {output.name for output in model.graph.output}

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name]) if not self.inits[name].external_data else None
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def only_reader(self, name: str, op_type: str) -> onnx.NodeProto | None:
        readers = self.readers.get(name, [])
        if len(readers) == 1 and readers[0].op_type == op_type and name not in self.outputs:
            return readers[0]
        return None


def _is_float_cast(node: onnx.NodeProto | None) -> bool:
    return node is not None and node.op_type == "Cast" and any(a.name == "to" and a.i == FLOAT for a in node.attribute)


def _other(node: onnx.NodeProto, name: str) -> str:
    return node.input[1] if node.input[0] == name else node.input[0]


@dataclass
class _ResidualNorm:
    """A residual Add and the RMSNorm of its sum, as found in the traced graph."""

    add: onnx.NodeProto
    sum_name: str  # what the other readers of the sum read (the Add's output, or its float Cast's)
    gamma: str
    epsilon: float
    nodes: list[onnx.NodeProto]  # every node the fused one replaces, the Add included
    output: str  # the norm's output

    def fused(self) -> onnx.NodeProto:
        return helper.make_node(
            "SkipSimplifiedLayerNormalization", [self.add.input[0], self.add.input[1], self.gamma],
            [self.output, "", "", self.sum_name], name=self.add.name + "_SkipSimplifiedLayerNorm",
            domain="com.microsoft", epsilon=self.epsilon)


def _match(g: _Graph, reduce: onnx.NodeProto) -> _ResidualNorm | None:
    """The RMSNorm ending the chain through `reduce` (ReduceMean of x²), when x is a residual Add's sum."""
    if any(a.name == "keepdims" and a.i == 0 for a in reduce.attribute):
        return None
    axes = g.constant(reduce.input[1]) if len(reduce.input) > 1 else next(
        (np.array(a.ints) for a in reduce.attribute if a.name == "axes"), None)
    if axes is None or axes.reshape(-1).tolist() != [-1]:
        return None
    power = g.producer.get(reduce.input[0])
    if power is None or power.op_type != "Pow" or not np.array_equal(g.constant(power.input[1]), np.float32(2)):
        return None
    x = power.input[0]
    cast = g.producer.get(x) if _is_float_cast(g.producer.get(x)) else None
    add = g.producer.get(cast.input[0] if cast else x)
    if add is None or add.op_type != "Add" or any(g.constant(name) is not None for name in add.input):
        return None
    if cast and [node.op_type for node in g.readers.get(add.output[0], [])] != ["Cast"]:
        return None
    eps_add = g.only_reader(reduce.output[0], "Add")
    if eps_add is None or (epsilon := g.constant(_other(eps_add, reduce.output[0]))) is None:
        return None
    sqrt = g.only_reader(eps_add.output[0], "Sqrt")
    inverse = sqrt and (g.only_reader(sqrt.output[0], "Div") or g.only_reader(sqrt.output[0], "Reciprocal"))
    if inverse is None or (inverse.op_type == "Div" and (inverse.input[1] != sqrt.output[0]
                                                         or not np.array_equal(g.constant(inverse.input[0]), np.float32(1)))):
        return None
    scale = g.only_reader(inverse.output[0], "Mul")
    if scale is None or _other(scale, inverse.output[0]) != x:
        return None
    if len(g.readers.get(power.output[0], [])) != 1:
        return None
    last = scale
    recast = g.readers.get(scale.output[0], [])
    chain = [power, reduce, eps_add, sqrt, inverse, scale]
    if len(recast) == 1 and _is_float_cast(recast[0]) and scale.output[0] not in g.outputs:
        last = recast[0]
        chain.append(last)
    weight = g.only_reader(last.output[0], "Mul")
    if weight is None:
        return None
    gamma = _other(weight, last.output[0])
    while gamma not in g.inits and g.producer.get(gamma) is not None and g.producer[gamma].op_type == "Identity":
        gamma = g.producer[gamma].input[0]  # Optimum writes equal weights once, the others as Identity of it
    if gamma not in g.inits or len(g.inits[gamma].dims) != 1:
        return None
    chain.append(weight)
    return _ResidualNorm(add, x, gamma, float(np.asarray(epsilon).reshape(-1)[0]),
                         [add, *([cast] if cast else []), *chain], weight.output[0])


def fuse_residual_norms(model: onnx.ModelProto) -> int:
    """Replace every residual Add + RMSNorm (traced: Pow, ReduceMean, Add eps, Sqrt, Div, Mul, Mul weight) by one
    SkipSimplifiedLayerNormalization. Returns how many."""
    g = _Graph(model)
    found = [match for node in model.graph.node if node.op_type == "ReduceMean" and (match := _match(g, node))]
    if not found:
        return 0
    removed = {id(node) for match in found for node in match.nodes}
    at_add = {id(match.add): match.fused() for match in found}
    nodes = []
    for node in model.graph.node:
        if id(node) in at_add:
            nodes.append(at_add[id(node)])
        elif id(node) not in removed:
            nodes.append(node)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    remove_unused_nodes(model)  # the eps, exponent and 1.0 Constants
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(found)
