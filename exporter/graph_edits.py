"""Small ONNX graph rewrites the exporter needs after Optimum has written the model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper


@dataclass
class TiedResult:
    embedding: str
    lm_head: str
    bytes_saved: int


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {tensor.name: tensor for tensor in model.graph.initializer}


def share_tied_embedding(model: onnx.ModelProto) -> TiedResult | None:
    """Store a tied input/output embedding once.

    Optimum writes the LM head as MatMul(hidden, E^T) with E^T as a second initializer. We point
    the LM head at E itself through FusedMatMul(transB=1) — a plain MatMul(x, Transpose(E)) would
    be constant-folded back into a second copy when onnxruntime loads the graph.
    """
    inits = _initializers(model)
    gathers = [node for node in model.graph.node if node.op_type == "Gather" and node.input[0] in inits]
    embeddings = {node.input[0]: inits[node.input[0]] for node in gathers if len(inits[node.input[0]].dims) == 2}
    if not embeddings:
        return None
    by_shape = {tuple(tensor.dims): name for name, tensor in embeddings.items()}
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    for index, node in enumerate(model.graph.node):
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        weight = inits[node.input[1]]
        if len(weight.dims) != 2 or (weight.dims[1], weight.dims[0]) not in by_shape:
            continue
        embedding_name = by_shape[(weight.dims[1], weight.dims[0])]
        embedding = numpy_helper.to_array(embeddings[embedding_name])
        head = numpy_helper.to_array(weight)
        if not np.array_equal(head.T, embedding):
            continue
        fused = helper.make_node("FusedMatMul", [node.input[0], embedding_name], list(node.output),
                                 name=node.name or "lm_head", domain="com.microsoft", transB=1, alpha=1.0)
        model.graph.node.remove(node)
        model.graph.node.insert(index, fused)
        if consumers.get(weight.name, 0) == 1:
            model.graph.initializer.remove(weight)
        if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        return TiedResult(embedding_name, node.name, head.nbytes)
    return None
