"""Rotary embedding inside GroupQueryAttention (`do_rotary=1`): which layers get it, that the tables are the
model's own, and that a partial-rotary or non-static-rope model still equals Optimum's unfused graph."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.generate import Generator, SamplingConfig, load
from tiny_models import tiny_tokenizer

PROMPT = "대한민국의 수도는 서울이다. 안녕하세요, 반갑습니다. 오늘 날씨가 정말 좋네요. 훈민정음은 세종대왕이 만들었다."

# do_rotary per layer of the shared tiny models (tests/tiny_models.py). gpt_neox there has head size 16 and
# rotary_pct 0.5: a 4-wide table, which onnxruntime's CPU kernel refuses (multiple of 8), so it keeps its own
# rotary; exaone4's full-attention layer has no rotary at all (global NoPE).
EXPECTED_ROTARY = {"gpt_neox": [0, 0], "llama": [1, 1], "qwen2": [1, 1], "qwen3": [1, 1],
                   "gemma3_text": [1, 1, 1], "exaone4": [1, 1, 1, 0]}


def _gqa_nodes(folder):
    import onnx

    graph = onnx.load(str(folder / "model.onnx")).graph  # tiny models: weights too
    return graph, [node for node in graph.node if node.op_type == "GroupQueryAttention"]


def _attribute(node, name: str) -> int:
    return next(attribute.i for attribute in node.attribute if attribute.name == name)


def _identities(graph) -> dict[str, str]:
    """Output -> input of the Identity nodes the exporter puts before a shared initializer's later uses."""
    return {node.output[0]: node.input[0] for node in graph.node if node.op_type == "Identity"}


@pytest.mark.parametrize("arch", list(EXPECTED_ROTARY))
def test_rotary_runs_inside_gqa_where_the_kernel_takes_it(arch, tiny_bundles):
    graph, nodes = _gqa_nodes(tiny_bundles[arch])
    assert [_attribute(node, "do_rotary") for node in nodes] == EXPECTED_ROTARY[arch]
    identities = _identities(graph)
    initializers = {tensor.name for tensor in graph.initializer}
    for node in nodes:
        rotary = _attribute(node, "do_rotary")
        assert (len(node.input) > 8 and node.input[7] != "") == bool(rotary)
        if rotary:
            assert all(identities.get(name, name) in initializers for name in node.input[7:9])


def test_gemma_local_and_global_layers_read_their_own_rope_base(tiny_checkpoints, tiny_bundles):
    """Gemma 3: sliding layers rotate with the local base (10k), full layers with the global one; the tables
    equal what the model's rotary modules compute."""
    import torch
    from onnx import numpy_helper
    from transformers import AutoModelForCausalLM

    graph, nodes = _gqa_nodes(tiny_bundles["gemma3_text"])
    identities = _identities(graph)
    tables = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["gemma3_text"]).eval()
    positions = torch.arange(300)[None]
    expected = {}
    for kind, module in (("local", model.model.rotary_emb_local), ("global", model.model.rotary_emb)):
        cos, sin = module(torch.zeros(1), positions)
        half = cos.shape[-1] // 2
        expected[kind] = (cos[0, :, :half].numpy(), sin[0, :, :half].numpy())
    assert not np.allclose(expected["local"][0], expected["global"][0])  # two bases, so the test can tell them apart
    for node, layer_type in zip(nodes, model.config.layer_types):
        cos, sin = (tables[identities.get(name, name)] for name in node.input[7:9])
        want_cos, want_sin = expected["local" if layer_type == "sliding_attention" else "global"]
        assert cos.shape[0] == model.config.max_position_embeddings
        np.testing.assert_allclose(cos[:300], want_cos, atol=1e-6)
        np.testing.assert_allclose(sin[:300], want_sin, atol=1e-6)


def _export_pair(config, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from exporter.export.convert import ExportConfig, export_model
    from exporter.export.sources import resolve_model

    tokenizer = tiny_tokenizer()
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(tmp_path / "checkpoint")
    tokenizer.save_pretrained(tmp_path / "checkpoint")
    for attention in ("fused", "unfused"):
        export_model(resolve_model(str(tmp_path / "checkpoint")), tmp_path / attention, ExportConfig(attention=attention),
                     progress=lambda message: None)
    return load(tmp_path / "fused"), load(tmp_path / "unfused")


def _assert_same_logits_and_tokens(fused, unfused):
    ids = fused.encode(PROMPT)
    a, b = fused.step(np.array([ids]), fused.empty_past()), unfused.step(np.array([ids]), unfused.empty_past())
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-4)
    config = SamplingConfig(max_new_tokens=64, stop_at_eos=False)
    assert Generator(fused).generate(ids, config).tokens == Generator(unfused).generate(ids, config).tokens


def _common(**overrides):
    return dict(vocab_size=320, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2, **overrides)


def test_partial_rotary_of_gpt_neox_runs_inside_gqa(tmp_path):
    """Head size 32, rotary_pct 0.5 (Polyglot-ko's ratio): GQA rotates the first 16 dims with an 8-wide table."""
    import transformers as tf

    fused, unfused = _export_pair(tf.GPTNeoXConfig(**_common(), rotary_pct=0.5), tmp_path)
    graph, nodes = _gqa_nodes(fused.folder)
    identities = _identities(graph)
    widths = {tuple(tensor.dims) for tensor in graph.initializer
              if tensor.name in {identities.get(name, name) for node in nodes for name in node.input[7:9]}}
    assert [_attribute(node, "do_rotary") for node in nodes] == [1, 1] and widths == {(512, 8)}
    _assert_same_logits_and_tokens(fused, unfused)


def test_length_dependent_rope_keeps_its_own_rotary(tmp_path):
    """Dynamic NTK scaling changes the frequencies with the sequence length: no fixed table, so do_rotary=0."""
    import transformers as tf

    config = tf.LlamaConfig(**_common(), num_key_value_heads=2, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    fused, unfused = _export_pair(config, tmp_path)
    assert [_attribute(node, "do_rotary") for node in _gqa_nodes(fused.folder)[1]] == [0, 0]
    _assert_same_logits_and_tokens(fused, unfused)


def test_export_records_the_rotary_tables_bytes(tiny_bundles):
    """What the memory budget may leave out of resident weights: gemma's two bases x cos/sin x 512 x 16 floats."""
    records = {arch: next(p.results for p in load(tiny_bundles[arch]).manifest.passes if p.name == "export")
               for arch in ("gemma3_text", "llama", "gpt_neox")}
    assert records["gemma3_text"]["rotary_table_bytes"] == 2 * 2 * 512 * 16 * 4
    assert records["llama"]["rotary_table_bytes"] == 2 * 512 * 8 * 4
    assert records["gpt_neox"]["rotary_table_bytes"] == 0  # its rotary stays in the graph


def test_max_context_caps_the_tables_and_the_manifest(tmp_path):
    """--max-context: the rotary tables stop at the bundle's context, the manifest says so, and the budget counts
    only the rows a run reads."""
    import torch
    import transformers as tf
    from transformers import AutoModelForCausalLM

    from exporter.export.convert import ExportConfig, export_model
    from exporter.export.sources import resolve_model
    from runtime.errors import KoedgeError
    from runtime.memory import predict_budget, untouched_rotary_bytes

    tokenizer = tiny_tokenizer()
    config = tf.LlamaConfig(**{**_common(), "max_position_embeddings": 4096}, num_key_value_heads=2)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(tmp_path / "checkpoint")
    tokenizer.save_pretrained(tmp_path / "checkpoint")
    resolved = resolve_model(str(tmp_path / "checkpoint"))
    with pytest.raises(KoedgeError, match="max-context"):
        export_model(resolved, tmp_path / "short", ExportConfig(max_context=100), progress=lambda message: None)
    export_model(resolved, tmp_path / "capped", ExportConfig(max_context=1024), progress=lambda message: None)
    model = load(tmp_path / "capped")
    graph, nodes = _gqa_nodes(model.folder)
    identities = _identities(graph)
    rows = {tensor.dims[0] for tensor in graph.initializer
            if tensor.name in {identities.get(name, name) for node in nodes for name in node.input[7:9]}}
    assert rows == {1024} and model.manifest.model.max_positions == 1024
    tables = next(p.results for p in model.manifest.passes if p.name == "export")["rotary_table_bytes"]
    assert tables == 2 * 1024 * 16 * 4
    assert untouched_rotary_bytes(model.manifest, 256) == tables * 3 // 4
    assert predict_budget(model.manifest, 200, 56).weights == model.manifest.weight_bytes() - tables * 3 // 4
