"""The fused export's other fusions: the tanh GELU as FastGelu, residual Add + RMSNorm as
SkipSimplifiedLayerNormalization. Their numerics are covered by the fused-vs-unfused tests
(tests/test_fused_attention.py); these check that the fusions happen where expected and nowhere else."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.generate import load

# Residual Add -> RMSNorm pairs per tiny model (2 layers unless noted): pre-norm decoders (llama, qwen) have
# one before each post-attention norm, one before each later input norm and one before the final norm; Gemma 3
# (3 layers) the same with its pre-feedforward norm; EXAONE 4 normalizes after each block (no norm follows a
# residual Add except the final one); GPT-NeoX uses LayerNorm, not RMSNorm.
SKIP_NORMS = {"gpt_neox": 0, "llama": 4, "qwen2": 4, "qwen3": 4, "gemma3_text": 6, "exaone4": 1}


def _graph(folder):
    import onnx

    return onnx.load(str(folder / "model.onnx"), load_external_data=False).graph


def _ops(folder) -> list[str]:
    return [node.op_type for node in _graph(folder).node]


@pytest.mark.parametrize("arch", list(SKIP_NORMS))
def test_residual_add_and_rms_norm_become_one_node(arch, tiny_bundles):
    ops = _ops(tiny_bundles[arch])
    assert ops.count("SkipSimplifiedLayerNormalization") == SKIP_NORMS[arch]
    results = next(p.results for p in load(tiny_bundles[arch]).manifest.passes if p.name == "export")
    assert results["skip_rms_norms_fused"] == SKIP_NORMS[arch]


def test_skip_norm_keeps_the_sum_as_the_next_residual(tiny_bundles):
    """Output 3 (input + skip) replaces the Add: something downstream must read it, else the residual is lost."""
    graph = _graph(tiny_bundles["gemma3_text"])
    readers = {name for node in graph.node for name in node.input}
    skips = [node for node in graph.node if node.op_type == "SkipSimplifiedLayerNormalization"]
    final = skips[-1]  # the final norm's sum has no later residual
    assert all(len(node.output) == 4 and node.output[3] in readers for node in skips if node is not final)


def test_gemma_tanh_gelu_is_one_fast_gelu_per_layer(tiny_bundles, unfused_graphs):
    fused = _ops(tiny_bundles["gemma3_text"])
    layers = load(tiny_bundles["gemma3_text"]).manifest.model.num_layers
    assert fused.count("FastGelu") == layers and "Tanh" not in fused
    assert unfused_graphs["gemma3_text"].count("Tanh") == layers  # the unfused graph keeps Optimum's nine ops
    for arch in ("llama", "gpt_neox"):  # SiLU; exact (erf) GELU, which onnxruntime fuses itself
        assert "FastGelu" not in _ops(tiny_bundles[arch])


@pytest.fixture(scope="module")
def unfused_graphs(tiny_checkpoints, tmp_path_factory):
    from exporter.export.convert import ExportConfig, export_model
    from exporter.export.sources import resolve_model

    out = tmp_path_factory.mktemp("unfused-gemma") / "gemma3_text"
    export_model(resolve_model(str(tiny_checkpoints["gemma3_text"])), out, ExportConfig(attention="unfused"),
                 progress=lambda message: None)
    return {"gemma3_text": _ops(out)}


def test_skip_norm_edit_equals_the_traced_norm_on_its_own_graph(tiny_checkpoints, tmp_path):
    """The same Optimum graph before and after `fuse_skip_rms_norms`: equal outputs in onnxruntime."""
    import onnx
    import onnxruntime as ort

    from exporter.export.graph_edits import fuse_skip_rms_norms

    model = onnx.load(str(_bundle_model(tiny_checkpoints, tmp_path)))
    before = model.SerializeToString()
    assert fuse_skip_rms_norms(model) == SKIP_NORMS["llama"]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # compare the graphs as written
    sessions = [ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
                for data in (before, model.SerializeToString())]
    ids = np.random.default_rng(0).integers(3, 300, (1, 12))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for item in sessions[0].get_inputs():
        if item.name.startswith("past_key_values."):  # an empty past: [batch 1, kv heads, 0, head dim]
            feeds[item.name] = np.zeros((1, item.shape[1], 0, item.shape[3]), np.float32)
        elif item.name == "position_ids":
            feeds[item.name] = np.arange(ids.shape[1])[None]
    a, b = (session.run(["logits"], feeds)[0] for session in sessions)
    np.testing.assert_allclose(a, b, atol=1e-5)


def _bundle_model(tiny_checkpoints, tmp_path):
    """The fused llama graph straight from Optimum, before koedge's graph edits."""
    from optimum.exporters.onnx import onnx_export_from_model

    from exporter.export.architectures import TASK
    from exporter.export.convert import load_torch_model
    from exporter.export.fused_attention import fused_attention
    from exporter.export.sources import resolve_model

    model = load_torch_model(resolve_model(str(tiny_checkpoints["llama"])))
    with fused_attention(model):
        onnx_export_from_model(model, tmp_path, task=TASK, do_validation=False)
    return tmp_path / "model.onnx"


@pytest.mark.parametrize("arch", list(SKIP_NORMS))
def test_every_reshape_has_a_constant_target_and_no_shape_arithmetic_is_left(arch, tiny_bundles, unfused_graphs):
    graph = _graph(tiny_bundles[arch])
    constants = {tensor.name for tensor in graph.initializer}
    constants |= {node.output[0] for node in graph.node if node.op_type == "Constant"}
    reshapes = [node for node in graph.node if node.op_type == "Reshape"]
    assert reshapes and all(node.input[1] in constants for node in reshapes)
    results = next(p.results for p in load(tiny_bundles[arch]).manifest.passes if p.name == "export")
    assert results["reshape_shapes_folded"] >= len(reshapes) - 1  # gpt_neox's rotary Reshape was constant already
    read = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
    assert all(any(output in read for output in node.output) for node in graph.node)  # nothing left unread
    if arch == "gemma3_text":  # the traced view/reshape arithmetic (Shape -> Gather -> Unsqueeze -> Concat) is gone
        assert _ops(tiny_bundles[arch]).count("Shape") < unfused_graphs[arch].count("Shape") / 4
