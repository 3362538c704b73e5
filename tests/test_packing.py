"""The quantized graph's fusions: packed MatMulNBits (exporter/quantize/packing.py): projections of one input become
one MatMulNBits and a Split with the same outputs, weights read elsewhere or at another width stay as they are; and
residual Add + RMSNorm as one SkipSimplifiedLayerNormalization (exporter/quantize/residual_norm.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter.quantize.bundle import quantize_bundle
from exporter.quantize.int4 import Int4Config, quantize_weight
from exporter.quantize.packing import pack_matmuls
from runtime.generate import load

QUIET = dict(progress=lambda message: None, evaluate=False)
K = 64


def _graph(widths: list[tuple[int, int]], seed: int = 0) -> onnx.ModelProto:
    """x -> one MatMulNBits per (N, bits), plus a MatMulNBits whose weights a Gather also reads (not packable)."""
    rng = np.random.default_rng(seed)
    nodes, inits, outputs = [], [], []
    for index, (n, bits) in enumerate(widths + [(24, 4)]):
        packed = quantize_weight(rng.normal(size=(K, n)).astype(np.float32), bits, Int4Config(algo="rtn"))
        names = [f"w{index}", f"s{index}", f"z{index}"]
        inits += [numpy_helper.from_array(array, name) for array, name in
                  zip((packed.data, packed.scales, packed.zero_points), names)]
        nodes.append(helper.make_node("MatMulNBits", ["x", *names], [f"y{index}"], domain="com.microsoft", K=K, N=n,
                                      bits=bits, block_size=packed.block_size, accuracy_level=4))
        outputs.append(helper.make_tensor_value_info(f"y{index}", TensorProto.FLOAT, None))
    nodes.append(helper.make_node("Identity", [names[0]], ["shared"]))  # the last weight is read twice
    outputs.append(helper.make_tensor_value_info("shared", TensorProto.UINT8, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, K])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=8)


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_one_input_one_width_becomes_one_matmul_and_a_split_with_the_same_outputs():
    model = _graph([(32, 4), (16, 4), (48, 8), (16, 4)])
    x = np.random.default_rng(1).normal(size=(2, 3, K)).astype(np.float32)
    before = _run(model, x)
    assert pack_matmuls(model) == 1
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("MatMulNBits") == 3 and ops.count("Split") == 1  # the 4-bit three packed; 8-bit; shared
    packed = next(node for node in model.graph.node if node.op_type == "MatMulNBits" and node.name.endswith("_packed"))
    assert next(a.i for a in packed.attribute if a.name == "N") == 32 + 16 + 16
    after = _run(model, x)
    for old, new in zip(before, after):
        np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-5)
    assert {tensor.name for tensor in model.graph.initializer}.isdisjoint({"w0", "w1", "w3"})  # no copy left behind


def test_nothing_to_pack_leaves_the_graph_alone():
    model = _graph([(32, 4), (16, 8)])
    before = model.SerializeToString()
    assert pack_matmuls(model) == 0 and model.SerializeToString() == before


@pytest.mark.parametrize("arch", ["gemma3_text", "llama"])
def test_quantized_graph_packs_and_fuses_residual_norms_and_decodes_the_same(arch, tiny_bundles, tmp_path):
    folder = tiny_bundles[arch]
    layers = load(folder).manifest.model.num_layers
    runs = {fuse: quantize_bundle(folder, tmp_path / f"fuse-{fuse}", Int4Config(algo="rtn", int8=[], fuse=fuse), **QUIET)
            for fuse in (True, False)}
    results = runs[True].report["results"]
    assert results["matmuls_packed"] == 2 * layers  # q+k+v, gate+up per layer
    assert results["residual_norms_fused"] == 2 * layers  # after attention and after the MLP, the last one included
    ops = {fuse: [n.op_type for n in onnx.load(str(r.folder / "model.onnx"), load_external_data=False).graph.node]
           for fuse, r in runs.items()}
    assert ops[False].count("MatMulNBits") - ops[True].count("MatMulNBits") == 3 * layers  # 7 -> 4 per layer
    assert ops[True].count("SkipSimplifiedLayerNormalization") == 2 * layers
    assert ops[False].count("Add") - ops[True].count("Add") >= 2 * layers
    models = {fuse: load(r.folder) for fuse, r in runs.items()}
    ids = np.array([models[True].encode("대한민국의 수도는 서울이다. 오늘 날씨가 정말 좋네요.")])
    steps = {fuse: m.step(ids, m.empty_past()) for fuse, m in models.items()}
    np.testing.assert_allclose(steps[True].logits, steps[False].logits, rtol=1e-4, atol=1e-4)
    token = np.array([[int(steps[True].logits[0, -1].argmax())]])  # one decode step through the KV cache
    np.testing.assert_allclose(models[True].step(token, steps[True].present).logits,
                               models[False].step(token, steps[False].present).logits, rtol=1e-4, atol=1e-4)
