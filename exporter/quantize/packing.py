"""One MatMulNBits for the projections that read the same input (q, k, v; gate, up), then a Split.

A decode step on a phone-sized CPU is a few hundred small kernel calls: each MatMulNBits call quantizes its input
to int8 blocks (accuracy_level 4) and wakes the thread pool, which costs about as much as reading a small
projection's weights. Weights in MatMulNBits layout are rows of N ([N, blocks, bytes], scales and zero points
[N, ...]), so projections of the same input with the same K, bits, block size and compute type concatenate along
N into one weight; a Split hands each consumer its own columns back. Each output column is computed as before,
from the same quantized input blocks. onnxruntime-genai packs q, k and v the same way; this also packs a gated
MLP's gate and up. Run after quantization, so every quantizer (and the GGUF matcher) still sees one weight per
projection.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

_ATTRIBUTES = ("K", "bits", "block_size", "accuracy_level")


def _key(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], readers: dict[str, int]) -> tuple | None:
    """What must be equal for two MatMulNBits to share one weight, or None if this one cannot be packed."""
    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
        return None
    inputs = [name for name in node.input]
    if len(inputs) > 4 or len(inputs) < 3 or any(not name for name in inputs[1:]):
        return None  # g_idx or bias: not packed
    tensors = [inits.get(name) for name in inputs[1:]]
    if any(t is None or t.data_location == onnx.TensorProto.EXTERNAL or readers[t.name] != 1 for t in tensors):
        return None  # a weight read elsewhere too (the tied table), or not in memory
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    zero_type = tensors[2].data_type if len(tensors) == 3 else None
    return (inputs[0], tuple(attrs.get(name, 0) for name in _ATTRIBUTES), len(tensors), zero_type)


def pack_matmuls(model: onnx.ModelProto) -> int:
    """Pack every group of MatMulNBits that read the same tensor with the same settings. Returns the groups packed."""
    graph = model.graph
    inits = {tensor.name: tensor for tensor in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    groups: dict[tuple, list[onnx.NodeProto]] = {}
    for node in graph.node:
        key = _key(node, inits, readers)
        if key is not None:
            groups.setdefault(key, []).append(node)
    groups = {key: nodes for key, nodes in groups.items() if len(nodes) > 1}
    if not groups:
        return 0
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    first = {id(nodes[0]): nodes for nodes in groups.values()}
    packed_ids = {id(node) for nodes in groups.values() for node in nodes}
    dropped: set[str] = set()
    new_nodes, new_inits = [], []
    for node in graph.node:
        if id(node) not in packed_ids:
            new_nodes.append(node)
            continue
        if id(node) not in first:
            continue  # written with its group, at the first member's place (its input exists there already)
        nodes = first[id(node)]
        name = "+".join(member.name for member in nodes)
        arrays = [[numpy_helper.to_array(inits[member.input[i]]) for member in nodes]
                  for i in range(1, len(node.input))]
        widths = [int(next(a.i for a in member.attribute if a.name == "N")) for member in nodes]
        names = []
        for i, parts in enumerate(arrays, start=1):
            tensor_name = f"{nodes[0].input[i]}_packed"
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(np.concatenate(parts, axis=0)), tensor_name))
            names.append(tensor_name)
        dropped.update(member.input[i] for member in nodes for i in range(1, len(node.input)))
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs["N"] = sum(widths)
        joined = f"{nodes[0].output[0]}_packed"
        new_nodes.append(helper.make_node("MatMulNBits", [node.input[0], *names], [joined], name=name + "_packed",
                                          domain="com.microsoft", **attrs))
        outputs = [member.output[0] for member in nodes]
        if opset >= 13:
            sizes = f"{joined}/split"
            new_inits.append(numpy_helper.from_array(np.array(widths, np.int64), sizes))
            new_nodes.append(helper.make_node("Split", [joined, sizes], outputs, name=name + "_split", axis=-1))
        else:
            new_nodes.append(helper.make_node("Split", [joined], outputs, name=name + "_split", axis=-1,
                                              split=widths))
    keep = [tensor for tensor in graph.initializer if tensor.name not in dropped]
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    graph.ClearField("initializer")
    graph.initializer.extend(keep + new_inits)
    return len(groups)
