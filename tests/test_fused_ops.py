"""The fused export's other graph changes: the tanh GELU as FastGelu, Reshapes with constant targets. Their
numerics are covered by the fused-vs-unfused tests (tests/test_fused_attention.py); these check that they happen
where expected and nowhere else."""

from __future__ import annotations

import pytest

from runtime.generate import load
from tiny_models import ARCHITECTURES


def _graph(folder):
    import onnx

    return onnx.load(str(folder / "model.onnx"), load_external_data=False).graph


def _ops(folder) -> list[str]:
    return [node.op_type for node in _graph(folder).node]


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


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_reshape_has_a_constant_target_and_no_shape_arithmetic_is_left(arch, tiny_bundles, unfused_graphs):
    graph = _graph(tiny_bundles[arch])
    constants = {tensor.name for tensor in graph.initializer}
    constants |= {node.output[0] for node in graph.node if node.op_type == "Constant"}
    reshapes = [node for node in graph.node if node.op_type == "Reshape"]
    assert all(node.input[1] in constants for node in reshapes)  # llama-like graphs keep none at all
    results = next(p.results for p in load(tiny_bundles[arch]).manifest.passes if p.name == "export")
    assert results["reshape_shapes_folded"] >= len(reshapes) - 1  # gpt_neox's rotary Reshape was constant already
    read = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
    assert all(any(output in read for output in node.output) for node in graph.node)  # nothing left unread
    if arch == "gemma3_text":  # the traced view/reshape arithmetic (Shape -> Gather -> Unsqueeze -> Concat) is gone
        assert _ops(tiny_bundles[arch]).count("Shape") < unfused_graphs[arch].count("Shape") / 4


@pytest.mark.parametrize("arch", ["gemma3_text", "qwen3", "exaone4"])
def test_onnxruntime_fuses_every_rms_norm_the_qk_norms_too(arch, tiny_bundles, tmp_path):
    """After onnxruntime's own optimizer no traced RMSNorm is left: the QK-norms included (Gemma 3 and EXAONE 4
    normalize a transposed view; the export keeps its axis last so the fusion recognizes it)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tiny_bundles[arch] / "model.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node]
    layers = load(tiny_bundles[arch]).manifest.model.num_layers
    assert "Pow" not in ops and "ReduceMean" not in ops
    assert ops.count("SimplifiedLayerNormalization") >= 2 * layers + 2 * layers  # block norms + q/k norms


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_reshape_round_trips_around_the_attention_are_gone(arch, tiny_bundles):
    """The head split and merge around GroupQueryAttention ([b, s, n*d] -> [b, s, n, d] -> [b, s, n*d]) fold away:
    no Reshape reads a Reshape, and the attention's output goes straight to o_proj."""
    graph = _graph(tiny_bundles[arch])
    producers = {output: node for node in graph.node for output in node.output}
    reshapes = [node for node in graph.node if node.op_type == "Reshape"]
    assert not [node.name for node in reshapes if producers.get(node.input[0], node).op_type == "Reshape"]
    attention_outputs = {node.output[0] for node in graph.node if node.op_type == "GroupQueryAttention"}
    readers = [node.op_type for node in graph.node if set(node.input) & attention_outputs]
    assert readers and set(readers) == {"MatMul"}
    results = next(p.results for p in load(tiny_bundles[arch]).manifest.passes if p.name == "export")
    assert results["reshape_shapes_folded"] > 0
