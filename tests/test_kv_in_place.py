"""The in-place KV cache: a GroupQueryAttention graph gets one preallocated buffer as past and present.

Optimum's graphs Concat the cache (no in-place possible); graphs like onnxruntime-genai's use GQA, whose
kernel appends into the past buffer when the present is bound to the same memory. A tiny two-layer GQA
graph is written by hand here, so the test needs neither genai nor a download.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from runtime.bundle import IOContract, TensorSpec, read_manifest, write_manifest

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 4, 2, 16, 2


def _gqa_graph(vocab: int, hidden: int, path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    inits = [weight("embed", vocab, hidden), weight("lm_head", hidden, vocab),
             numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array(1, np.int64), "index1")]
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["h0"]),
             helper.make_node("ReduceSum", ["attention_mask", "axis1"], ["mask_sum"], keepdims=0),
             helper.make_node("Sub", ["mask_sum", "one"], ["mask_sum_1"]),
             helper.make_node("Cast", ["mask_sum_1"], ["seqlens_k"], to=TensorProto.INT32),
             helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
             helper.make_node("Gather", ["mask_shape", "index1"], ["total"]),
             helper.make_node("Cast", ["total"], ["total_sequence_length"], to=TensorProto.INT32)]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])]
    h = "h0"
    for layer in range(LAYERS):
        q, k, v, o = (f"l{layer}.{name}" for name in "qkvo")
        inits += [weight(q, hidden, HEADS * HEAD_DIM), weight(k, hidden, KV_HEADS * HEAD_DIM),
                  weight(v, hidden, KV_HEADS * HEAD_DIM), weight(o, HEADS * HEAD_DIM, hidden)]
        past_k, past_v = f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"
        present_k, present_v = f"present.{layer}.key", f"present.{layer}.value"
        for name in (past_k, past_v):
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                        ["batch", KV_HEADS, "past", HEAD_DIM]))
        for name in (present_k, present_v):
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                         ["batch", KV_HEADS, "present", HEAD_DIM]))
        nodes += [helper.make_node("MatMul", [h, q], [f"{q}.out"]), helper.make_node("MatMul", [h, k], [f"{k}.out"]),
                  helper.make_node("MatMul", [h, v], [f"{v}.out"]),
                  helper.make_node("GroupQueryAttention", [f"{q}.out", f"{k}.out", f"{v}.out", past_k, past_v,
                                                           "seqlens_k", "total_sequence_length"],
                                   [f"l{layer}.attn", present_k, present_v], domain="com.microsoft",
                                   num_heads=HEADS, kv_num_heads=KV_HEADS),
                  helper.make_node("MatMul", [f"l{layer}.attn", o], [f"{o}.out"]),
                  helper.make_node("Add", [h, f"{o}.out"], [f"h{layer + 1}"])]
        h = f"h{layer + 1}"
    nodes.append(helper.make_node("MatMul", [h, "lm_head"], ["logits"]))
    graph = helper.make_graph(nodes, "tiny-gqa", inputs, outputs, inits)
    model = helper.make_model(graph, ir_version=10,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def gqa_bundle(tiny_bundles, tmp_path_factory):
    """A bundle folder: the tiny llama's tokenizer and model facts, a hand-written GQA graph."""
    import onnx

    source = tiny_bundles["llama"]
    folder = tmp_path_factory.mktemp("gqa") / "bundle"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    manifest = read_manifest(source)
    _gqa_graph(manifest.model.vocab_size, manifest.model.hidden_size, folder / "model.onnx")
    graph = onnx.load(str(folder / "model.onnx")).graph
    dtypes = {1: "float32", 6: "int32", 7: "int64"}

    def specs(values):
        return [TensorSpec(v.name, dtypes[v.type.tensor_type.elem_type],
                           [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

    manifest.io = IOContract(inputs=specs(graph.input), outputs=specs(graph.output), kv_shared_buffer=True)
    manifest.model.num_layers, manifest.model.num_kv_heads, manifest.model.head_dim = LAYERS, KV_HEADS, HEAD_DIM
    manifest.onnx_file = "model.onnx"
    manifest.quantized_weights = False
    write_manifest(folder, manifest)
    return folder


def test_in_place_cache_equals_numpy_loop_and_never_reallocates(gqa_bundle):
    from runtime.generate import Generator, SamplingConfig, load
    from runtime.kvcache import BoundCache, NumpyCache

    lm = load(gqa_bundle)
    ids = lm.encode("대한민국의 수도는 서울이다. 한국어 모델을 휴대폰에서 돌립니다.")
    bound, plain = BoundCache(lm), NumpyCache(lm)
    assert bound.in_place and not plain.lm.manifest.io.logits_to_keep
    bound.reserve(len(ids) + 40)
    pointers = [value.data_ptr() for value in bound._past]
    a, b = bound.run(ids), plain.run(ids)
    np.testing.assert_allclose(a, b, atol=1e-5)
    for _ in range(40):
        token = int(a[0].argmax())
        a, b = bound.run([token]), plain.run([token])
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert [value.data_ptr() for value in bound._past] == pointers  # written in place, never reallocated
    assert bound.capacity == len(ids) + 40 == bound.length
    # past the reserved capacity the buffers grow once and keep the cached positions
    token = int(a[0].argmax())
    np.testing.assert_allclose(bound.run([token]), plain.run([token]), atol=1e-5)
    assert bound.capacity >= 2 * (len(ids) + 40)
    config = SamplingConfig(max_new_tokens=30, stop_at_eos=False)
    assert Generator(lm).generate(ids, config).tokens == Generator(lm, io_binding=False).generate(ids, config).tokens
