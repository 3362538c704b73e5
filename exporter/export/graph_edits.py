"""Small ONNX graph rewrites the exporter needs after Optimum has written the model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from runtime.bundle import LOGITS_TO_KEEP


@dataclass
class TiedResult:
    embedding: str
    lm_head: str
    bytes_saved: int


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {tensor.name: tensor for tensor in model.graph.initializer}


def _lm_head_node(matmul: onnx.NodeProto, embedding_name: str) -> onnx.NodeProto:
    return helper.make_node("FusedMatMul", [matmul.input[0], embedding_name], list(matmul.output),
                            name=matmul.name or "lm_head", domain="com.microsoft", transB=1, alpha=1.0)


def _use_contrib_domain(model: onnx.ModelProto) -> None:
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _transposed_embeddings(model: onnx.ModelProto, embeddings: dict) -> TiedResult | None:
    """Optimum ties some models (Llama) as MatMul(h, Transpose(E)): stored once on disk, but
    onnxruntime folds the Transpose into a second copy in memory at load. Same fix as below."""
    nodes = list(model.graph.node)
    producers = {output: node for node in nodes for output in node.output}
    for index, node in enumerate(nodes):
        source = producers.get(node.input[1]) if node.op_type == "MatMul" else None
        if source is None or source.op_type != "Transpose" or source.input[0] not in embeddings:
            continue
        perm = next((list(helper.get_attribute_value(a)) for a in source.attribute if a.name == "perm"), [1, 0])
        if perm != [1, 0]:
            continue
        model.graph.node.remove(node)
        model.graph.node.insert(index, _lm_head_node(node, source.input[0]))
        if sum(source.output[0] in other.input for other in model.graph.node) == 0:
            model.graph.node.remove(source)
        _use_contrib_domain(model)
        tensor = embeddings[source.input[0]]
        return TiedResult(source.input[0], node.name, 4 * tensor.dims[0] * tensor.dims[1])
    return None


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
    transposed = _transposed_embeddings(model, embeddings)
    if transposed:
        return transposed
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
        model.graph.node.remove(node)
        model.graph.node.insert(index, _lm_head_node(node, embedding_name))
        if consumers.get(weight.name, 0) == 1:
            model.graph.initializer.remove(weight)
        _use_contrib_domain(model)
        return TiedResult(embedding_name, node.name, head.nbytes)
    return None

# Shape-preserving ops that may sit between the LM head and the logits output (softcapping, casts).
_ELEMENTWISE = {"Cast", "Div", "Mul", "Tanh", "Add", "Identity"}


def _lm_head(model: onnx.ModelProto, logits: str) -> onnx.NodeProto | None:
    """The MatMul-like node whose weight is an initializer and whose output becomes `logits`."""
    inits = _initializers(model)
    producers = {output: node for node in model.graph.node for output in node.output}
    node = producers.get(logits)
    while node is not None:
        if node.op_type in ("MatMul", "FusedMatMul", "Gemm", "MatMulNBits") and node.input[1] in inits:
            return node
        if node.op_type not in _ELEMENTWISE:
            return None
        node = next((producers[name] for name in node.input if name in producers and name not in inits), None)
    return None


def add_logits_to_keep(model: onnx.ModelProto, logits: str = "logits") -> bool:
    """Give the graph an input `logits_to_keep` (int64 [1]): 0 = every position, 1 = the last only.

    With 1 the LM head runs on the last position only. Generation needs nothing else, and for a
    262k vocabulary the head is most of a prefill's work (gemma-3-270m: 168M multiply-adds per
    position vs 100M for its 18 layers) and its output the biggest tensor (512 positions = 512 MiB).
    Evaluation feeds 0. Implemented as Slice(hidden, -k, +inf) on the sequence axis before the
    head; -0 = 0 keeps everything. A plain required input, not an initializer with a default: the
    onnxruntime Java API (the phone app) refuses to feed such "overridable" initializers.
    Returns False when no LM head is recognised.
    """
    head = _lm_head(model, logits)
    if head is None or any(item.name == LOGITS_TO_KEEP for item in model.graph.input):
        return False
    hidden = head.input[0]
    sliced = f"{hidden}/last_positions"
    model.graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, onnx.TensorProto.INT64, [1]))
    model.graph.initializer.extend([
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), f"{sliced}/end"),
        numpy_helper.from_array(np.array([1], np.int64), f"{sliced}/axis"),
    ])
    index = list(model.graph.node).index(head)
    model.graph.node.insert(index, helper.make_node("Slice", [hidden, f"{sliced}/start", f"{sliced}/end",
                                                              f"{sliced}/axis"], [sliced], name=sliced))
    model.graph.node.insert(index, helper.make_node("Neg", [LOGITS_TO_KEEP], [f"{sliced}/start"],
                                                    name=f"{sliced}/neg"))
    head.input[0] = sliced
    for output in model.graph.output:  # the logits' sequence axis no longer follows input_ids'
        if output.name == logits and len(output.type.tensor_type.shape.dim) == 3:
            output.type.tensor_type.shape.dim[1].dim_param = "logits_length"
    return True
