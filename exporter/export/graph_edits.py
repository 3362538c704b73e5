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


def name_present_dims(model: onnx.ModelProto) -> None:
    """Give each `present.*` output the fixed KV-head and head-dim sizes of its `past_key_values.*` input.

    The TorchScript exporter cannot infer a custom op's output shapes (GroupQueryAttention), so it names
    them after the node; runners and the manifest expect the same numbers as the past's.
    """
    inputs = {item.name: item for item in model.graph.input}
    for output in model.graph.output:
        if not output.name.startswith("present."):
            continue
        past = inputs.get("past_key_values." + output.name[len("present."):])
        if past is None:
            continue
        source, target = past.type.tensor_type.shape.dim, output.type.tensor_type.shape.dim
        for axis in (1, 3):
            if source[axis].HasField("dim_value"):
                target[axis].dim_value = source[axis].dim_value


def kv_in_float16(model: onnx.ModelProto) -> int:
    """Make the KV cache float16: past inputs and present outputs of a fused graph exported with `half_kv`.

    The exporter wrote Cast(past -> float16) before each GroupQueryAttention and Cast(present -> float32)
    after it; the casts go, the inputs and outputs become float16, and the runtime binds float16 buffers
    (still one buffer for past and present). Returns the number of KV tensors changed.
    """
    nodes = list(model.graph.node)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {output: node for node in nodes for output in node.output}
    changed = 0
    for item in model.graph.input:
        users = consumers.get(item.name, [])
        if not item.name.startswith("past_key_values.") or len(users) != 1 or not _is_cast(users[0], 10):
            continue
        cast = users[0]
        for user in consumers.get(cast.output[0], []):
            user.input[:] = [item.name if name == cast.output[0] else name for name in user.input]
        model.graph.node.remove(cast)
        item.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
        changed += 1
    for item in model.graph.output:
        cast = producers.get(item.name)
        if not item.name.startswith("present.") or cast is None or not _is_cast(cast, 1):
            continue
        source = producers[cast.input[0]]
        source.output[:] = [item.name if name == cast.input[0] else name for name in source.output]
        model.graph.node.remove(cast)
        item.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
        changed += 1
    return changed


def _is_cast(node: onnx.NodeProto, to: int) -> bool:
    return node.op_type == "Cast" and any(a.name == "to" and a.i == to for a in node.attribute)


def _weightless_copy(model: onnx.ModelProto, keep_elements: int = 64) -> onnx.ModelProto:
    """The graph with every larger initializer turned into a graph input of the same type and shape: shape
    inference needs the small integer constants' values, never the weights' (and copying them costs GBs)."""
    copy = onnx.ModelProto()
    copy.ir_version, copy.producer_name = model.ir_version, model.producer_name
    copy.opset_import.extend(model.opset_import)
    graph = copy.graph
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    for tensor in model.graph.initializer:
        if int(np.prod(tensor.dims)) <= keep_elements and tensor.data_location != onnx.TensorProto.EXTERNAL:
            graph.initializer.append(tensor)
        else:
            graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return copy


def _reshape_target(source: list, target: list) -> list[int] | None:
    """A constant Reshape target taking `source` to `target` (symbolic dims): a dimension equal to the source's at
    the same index becomes 0 (copy), a number stays, at most one other becomes -1; None if that cannot say it."""
    if not source or not target or any(dim in (None, "", 0) for dim in target):
        return None
    shape = [dim if isinstance(dim, int) else 0 if index < len(source) and source[index] == dim else None
             for index, dim in enumerate(target)]
    if shape.count(None) > 1:
        return None
    return [-1 if dim is None else dim for dim in shape]


def fold_reshape_shapes(model: onnx.ModelProto) -> int:
    """Give every Reshape whose target shape the graph computes (Shape -> Gather -> Unsqueeze -> Concat, traced
    from `view(*x.shape[:-1], heads, dim)`) a constant target, collapse Reshape chains, drop the Reshapes that
    give back their input's shape, then the shape arithmetic left unused.

    onnxruntime's symbolic shape inference (no dimension merging: nothing is assumed) names each output
    dimension (`_reshape_target` turns them into a constant target). onnxruntime neither folds these nor removes a
    Concat once nothing reads it: about 14 nodes per attention layer. The chains are the head split and merge
    around the fused attention ([b, s, kv*d] -> [b, s, kv, d] -> [b, s, kv*d] for v, the same for the attention's
    output): 4 Reshapes per layer, ~5% of a small model's decode step on 2 cores. Returns the Reshapes changed.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        inferred = SymbolicShapeInference.infer_shapes(_weightless_copy(model), auto_merge=False)
    except Exception:  # an op the inference does not know: leave the graph as it is
        return 0
    if inferred is None:
        return 0

    def dims(value) -> list:
        return [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
                for d in value.type.tensor_type.shape.dim]

    shapes = {value.name: dims(value) for value in [*inferred.graph.value_info, *inferred.graph.input,
                                                     *inferred.graph.output]}
    inits = _initializers(model)
    producers = {output: node for node in model.graph.node for output in node.output}
    outputs = {output.name for output in model.graph.output}
    changed = 0
    def plain_reshape(node: onnx.NodeProto | None) -> bool:  # allowzero=1 makes a 0 in the target a real 0
        return node is not None and node.op_type == "Reshape" and not any(
            a.name == "allowzero" and a.i == 1 for a in node.attribute)

    for node in model.graph.node:
        if not plain_reshape(node):
            continue
        source = node.input[0]
        while plain_reshape(producers.get(source)):
            source = producers[source].input[0]  # a Reshape of a Reshape reads the first one's input
        constant = node.input[1] in inits or producers.get(node.input[1], node).op_type == "Constant"
        if constant and source == node.input[0]:
            continue
        shape = _reshape_target(shapes.get(source), shapes.get(node.output[0]))
        if shape is None:
            continue
        changed += 1
        if shapes[source] == shapes[node.output[0]] and node.output[0] not in outputs:  # the input's own shape
            for reader in model.graph.node:
                for index, name in enumerate(reader.input):
                    if name == node.output[0]:
                        reader.input[index] = source
            for value in model.graph.value_info:
                if value.name == node.output[0]:
                    model.graph.value_info.remove(value)
                    break
            continue
        name = f"{node.output[0]}/shape"
        model.graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), name))
        node.input[0], node.input[1] = source, name
    if changed:
        remove_unused_nodes(model)
    return changed


def remove_unused_nodes(model: onnx.ModelProto) -> int:
    """Drop nodes none of whose outputs is read (repeatedly), then initializers nothing reads."""
    outputs = {output.name for output in model.graph.output}
    removed = 0
    while True:
        read = {name for node in model.graph.node for name in node.input}
        unused = [node for node in model.graph.node if not any(out in read or out in outputs for out in node.output)]
        if not unused:
            break
        for node in unused:
            model.graph.node.remove(node)
        removed += len(unused)
    read = {name for node in model.graph.node for name in node.input} | outputs
    for tensor in [tensor for tensor in model.graph.initializer if tensor.name not in read]:
        model.graph.initializer.remove(tensor)
    return removed


def rotary_table_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the cos/sin tables GroupQueryAttention rotates with (inputs 7 and 8). They cover every position
    the model allows (gemma-3-270m: 4 x 32,768 x 128 floats, 64 MiB) but a run reads only the rows of its own
    context, so they sit in the memory-mapped file rather than in resident memory: the export records them for
    the memory budget."""
    inits = _initializers(model)
    identities = {node.output[0]: node.input[0] for node in model.graph.node if node.op_type == "Identity"}
    names = {identities.get(name, name) for node in model.graph.node if node.op_type == "GroupQueryAttention"
             for name in node.input[7:9] if name}
    return sum(int(np.prod(inits[name].dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(inits[name].data_type)).itemsize
               for name in names if name in inits)
