"""Fused attention (GroupQueryAttention, KV written in place) against Optimum's unfused graph of the same
checkpoint: same logits, same 64 greedy tokens, prompts past the tiny sliding window; the projections stay
plain MatMuls with the FP32 weights (what quantization and weight substitution match on)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from runtime.errors import KoedgeError
from runtime.generate import Generator, SamplingConfig, load
from runtime.kvcache import BoundCache, NumpyCache
from tiny_models import ARCHITECTURES, SLIDING_WINDOW

PROMPT = "대한민국의 수도는 서울이다. 안녕하세요, 반갑습니다. 오늘 날씨가 정말 좋네요. 훈민정음은 세종대왕이 만들었다."


@pytest.fixture(scope="module")
def unfused_bundles(tiny_checkpoints, tmp_path_factory):
    from exporter.export.convert import ExportConfig, export_model
    from exporter.export.sources import resolve_model

    root = tmp_path_factory.mktemp("unfused")
    config = ExportConfig(attention="unfused")
    for arch, checkpoint in tiny_checkpoints.items():
        export_model(resolve_model(str(checkpoint)), root / arch, config, progress=lambda message: None)
    return {arch: root / arch for arch in tiny_checkpoints}


def _graph(folder):
    import onnx

    return onnx.load(str(folder / "model.onnx"))


def _matmul_weights(model) -> set[str]:
    from onnx import numpy_helper

    inits = {tensor.name: tensor for tensor in model.graph.initializer}
    return {hashlib.sha256(numpy_helper.to_array(inits[node.input[1]]).tobytes()).hexdigest()
            for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in inits}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fused_graph_has_one_gqa_per_layer_and_the_same_matmul_weights(arch, tiny_bundles, unfused_bundles):
    fused, unfused = _graph(tiny_bundles[arch]), _graph(unfused_bundles[arch])
    layers = load(tiny_bundles[arch]).manifest.model.num_layers
    assert sum(node.op_type == "GroupQueryAttention" for node in fused.graph.node) == layers
    assert not any(node.op_type == "GroupQueryAttention" for node in unfused.graph.node)
    assert _matmul_weights(fused) == _matmul_weights(unfused)  # q/k/v/o and MLP untouched, never packed
    producers = {out: node for node in fused.graph.node for out in node.output}
    for output in fused.graph.output:
        if output.name.startswith("present."):
            assert producers[output.name].op_type == "GroupQueryAttention"  # no Concat: in place
    assert load(tiny_bundles[arch]).manifest.io.kv_shared_buffer
    assert not load(unfused_bundles[arch]).manifest.io.kv_shared_buffer


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fused_equals_unfused_logits_and_64_greedy_tokens(arch, tiny_bundles, unfused_bundles):
    fused, unfused = load(tiny_bundles[arch]), load(unfused_bundles[arch])
    ids = fused.encode(PROMPT)
    assert len(ids) > 2 * SLIDING_WINDOW  # the prompt crosses the tiny sliding window
    a, b = fused.step(np.array([ids]), fused.empty_past()), unfused.step(np.array([ids]), unfused.empty_past())
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-4)  # every prompt position
    config = SamplingConfig(max_new_tokens=64, stop_at_eos=False)
    in_place = Generator(fused).generate(ids, config)  # one buffer, past = present
    ping_pong = Generator(unfused).generate(ids, config)  # Optimum's Concat, two slabs
    assert in_place.tokens == ping_pong.tokens and len(in_place.tokens) == 64


@pytest.mark.parametrize("arch", ["gemma3_text", "gpt_neox"])
def test_in_place_loop_equals_numpy_loop_across_buffer_growth(arch, tiny_bundles):
    lm = load(tiny_bundles[arch])
    ids = lm.encode(PROMPT)
    bound, plain = BoundCache(lm), NumpyCache(lm)
    bound.reserve(len(ids) + 4)  # small, so decoding outgrows it and the buffer is copied once
    a, b = bound.run(ids), plain.run(ids)
    np.testing.assert_allclose(a, b, atol=1e-5)
    for _ in range(12):
        token = int(b[0].argmax())
        a, b = bound.run([token]), plain.run([token])
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert bound.capacity > len(ids) + 4 and bound.length == plain.length


def test_sliding_window_layers_decode_on_views_of_their_buffers(tiny_bundles):
    """gemma3_text: the local layers' KV is bound from a window-sized tail on; logits equal the numpy loop's."""
    lm = load(tiny_bundles["gemma3_text"])
    io, info = lm.manifest.io, lm.manifest.model
    local = [i for i, kind in enumerate(info.layer_types) if kind == "sliding_attention"]
    assert io.kv_window_offset == "kv_window_offset" and io.kv_window_layers == local and io.kv_window == SLIDING_WINDOW
    ids = lm.encode(PROMPT)
    bound, plain = BoundCache(lm), NumpyCache(lm)
    a, b = bound.run(ids), plain.run(ids)
    offsets = set()
    for _ in range(24):
        token = int(b[0].argmax())
        a, b = bound.run([token]), plain.run([token])
        np.testing.assert_allclose(a, b, atol=1e-5)
        offsets.add(bound._bound_offset)
    assert len(offsets) > 2 and max(offsets) <= bound.length - SLIDING_WINDOW  # the views moved, inside the window


@pytest.mark.parametrize("arch", ["gemma3_text", "gpt_neox"])
def test_float16_kv_cache_halves_the_buffer_and_keeps_the_logits(arch, tiny_checkpoints, tiny_bundles, tmp_path):
    from exporter.export.convert import ExportConfig, export_model
    from exporter.export.sources import resolve_model

    export_model(resolve_model(str(tiny_checkpoints[arch])), tmp_path / "half", ExportConfig(kv_dtype="float16"),
                 progress=lambda message: None)  # parity against torch at the FP32 tolerance
    half, full = load(tmp_path / "half"), load(tiny_bundles[arch])
    assert half.manifest.io.kv_dtype == "float16" and half.manifest.io.kv_shared_buffer
    ids = half.encode(PROMPT)
    a, b, plain = BoundCache(half), BoundCache(full), NumpyCache(half)
    np.testing.assert_allclose(a.run(ids), b.run(ids), atol=1e-2)
    np.testing.assert_allclose(a.run([5]), plain.run(ids + [5]), atol=1e-5)  # in place = numpy loop
    assert a.kv_bytes() * 2 == b.kv_bytes()


def test_unknown_attention_is_one_clear_error(tiny_checkpoints, tmp_path):
    from exporter.export.convert import ExportConfig, export_model
    from exporter.export.sources import resolve_model

    with pytest.raises(KoedgeError, match="unknown attention"):
        export_model(resolve_model(str(tiny_checkpoints["llama"])), tmp_path / "x", ExportConfig(attention="flash"))
    with pytest.raises(KoedgeError, match="KV dtype"):
        export_model(resolve_model(str(tiny_checkpoints["llama"])), tmp_path / "x",
                     ExportConfig(attention="unfused", kv_dtype="float16"))


@pytest.mark.slow
def test_gemma_fused_equals_unfused_past_the_window(gemma_checkpoint, gemma_bundle, tmp_path_factory):
    """gemma-3-270m: 64 greedy tokens identical, for a short prompt and one past the 512-token window."""
    from exporter.export.convert import ExportConfig, export_model
    from runtime.bundle import read_manifest
    from runtime.validate import prompt_ids

    bundles = {read_manifest(gemma_bundle).io.kv_shared_buffer: gemma_bundle}
    fused = not next(iter(bundles))  # export the kind the session's bundle is not
    out = tmp_path_factory.mktemp("gemma-other") / "bundle"
    export_model(gemma_checkpoint, out, ExportConfig(dtype="fp32", attention="fused" if fused else "unfused",
                                                     parity_long_prompt=False),
                 progress=lambda message: None)
    bundles[fused] = out
    in_place, ping_pong = load(bundles[True]), load(bundles[False])
    window = in_place.manifest.model.sliding_window
    config = SamplingConfig(max_new_tokens=64, stop_at_eos=False)
    for count in (32, window + 88):
        ids = prompt_ids(in_place, count)
        assert Generator(in_place).generate(ids, config).tokens == Generator(ping_pong).generate(ids, config).tokens
