"""Export: every architecture exports, matches torch, and writes a complete manifest atomically."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.bundle import MANIFEST, read_manifest, verify_files
from runtime.errors import KoedgeError
from tiny_models import ARCHITECTURES, SLIDING_WINDOW


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_export_matches_torch(tiny_bundles, arch):
    manifest = read_manifest(tiny_bundles[arch])
    export = next(record for record in manifest.passes if record.name == "export")
    cases = export.results["parity"]["cases"]
    assert all(case["max_abs_diff"] < 1e-3 and case["same_argmax"] for case in cases)
    assert all(case["decode_steps"] == 8 for case in cases)
    if arch in ("gemma3_text", "exaone4"):  # sliding-window models are also checked past the window
        assert manifest.model.sliding_window == SLIDING_WINDOW
        assert any(case["tokens"] > SLIDING_WINDOW for case in cases)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_manifest_describes_the_graph(tiny_bundles, tiny_checkpoints, arch):
    folder = tiny_bundles[arch]
    manifest = read_manifest(folder)
    config = json.loads((tiny_checkpoints[arch] / "config.json").read_text())
    assert manifest.model.architecture == config["model_type"]
    assert manifest.model.num_layers == config["num_hidden_layers"]
    assert manifest.model.num_kv_heads == config.get("num_key_value_heads", config["num_attention_heads"])
    assert manifest.model.vocab_size == config["vocab_size"]
    assert manifest.tokens.eos_token_ids == [1]
    names = manifest.io.input_names()
    assert names[:2] == ["input_ids", "attention_mask"]
    for layer in range(manifest.model.num_layers):
        assert manifest.io.past_key.format(layer=layer) in names
    assert manifest.io.uses_position_ids == ("position_ids" in names)
    assert {"model.onnx", "model.onnx.data", "tokenizer.json"} <= set(manifest.files)
    assert verify_files(folder, manifest) == []
    assert [record.name for record in manifest.passes] == ["export"]


def test_tied_embedding_is_stored_once(tiny_bundles):
    import onnx

    model = onnx.load(str(tiny_bundles["gemma3_text"] / "model.onnx"), load_external_data=False)
    manifest = read_manifest(tiny_bundles["gemma3_text"])
    vocab, hidden = manifest.model.vocab_size, manifest.model.hidden_size
    big = [t.name for t in model.graph.initializer if sorted(t.dims) == sorted([vocab, hidden])]
    assert len(big) == 1
    assert any(node.op_type == "FusedMatMul" and big[0] in node.input for node in model.graph.node)


def test_numpy_step_is_consistent_with_prefill(tiny_bundles):
    """Decoding token by token gives the same logits as one prefill of the whole sequence."""
    from runtime.model import CausalLM

    runner = CausalLM(tiny_bundles["llama"])
    ids = runner.encode("대한민국의 수도는 서울이다.")
    full = runner.step(np.array([ids]), runner.empty_past()).logits[0]
    out = runner.step(np.array([ids[:3]]), runner.empty_past())
    for position in range(3, len(ids)):
        out = runner.step(np.array([[ids[position]]]), out.present)
        np.testing.assert_allclose(out.logits[0, -1], full[position], atol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_to_keep_runs_the_head_on_the_last_position(tiny_bundles, arch):
    """The optional input: absent = every position (evaluation), 1 = the last one only (generation)."""
    from runtime.model import CausalLM

    runner = CausalLM(tiny_bundles[arch])
    assert runner.manifest.io.logits_to_keep == "logits_to_keep" and runner.keeps_last_logits
    ids = np.array([runner.encode("한국어 모델의 마지막 위치만 계산한다.")])
    full = runner.step(ids, runner.empty_past())
    last = runner.step(ids, runner.empty_past(), last_only=True)
    assert full.logits.shape[1] == ids.shape[1] and last.logits.shape[1] == 1
    np.testing.assert_allclose(last.logits[0, 0], full.logits[0, -1], atol=1e-5)
    for name, value in last.present.items():  # the cache is untouched by the slice
        np.testing.assert_array_equal(value, full.present[name])


def _koedge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporter.cli", *args], capture_output=True, text=True)


def test_existing_output_is_refused_without_overwrite(tiny_checkpoints, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    result = _koedge("export", "--model", str(tiny_checkpoints["llama"]), "--out", str(out))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"koedge: error: {out} exists; pass --overwrite to replace it"


@pytest.mark.parametrize("model, message", [
    ("no-such-model", "unknown model 'no-such-model'"),
    ("./missing/folder", "unknown model './missing/folder'"),
])
def test_bad_model_names_give_one_line(model, message, tmp_path):
    result = _koedge("export", "--model", model, "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "out").exists()


def test_folder_without_config_is_rejected(tmp_path):
    from exporter.export.sources import resolve_model

    with pytest.raises(KoedgeError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_unsupported_architecture_is_rejected(tmp_path):
    from transformers import BertConfig, BertLMHeadModel

    BertLMHeadModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, is_decoder=True)).save_pretrained(tmp_path / "bert")
    result = _koedge("export", "--model", str(tmp_path / "bert"), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "architecture 'bert' cannot be exported" in result.stderr
    assert not (tmp_path / "out").exists()


def test_failed_export_leaves_no_half_bundle(tiny_checkpoints, tmp_path):
    """A parity failure (tolerance 0) happens after files are written: nothing may remain."""
    from exporter.export.convert import ExportConfig, export_model
    from exporter.export.sources import resolve_model

    out = tmp_path / "bundle"
    with pytest.raises(KoedgeError, match="parity check failed"):
        export_model(resolve_model(str(tiny_checkpoints["gpt_neox"])), out, ExportConfig(parity_tolerance=-1.0),
                     progress=lambda message: None)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_a_bundle(tiny_checkpoints, tmp_path):
    out = tmp_path / "bundle"
    for _ in range(2):
        result = _koedge("export", "--model", str(tiny_checkpoints["qwen2"]), "--out", str(out), "--overwrite")
        assert result.returncode == 0, result.stderr
    assert (out / MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_fp16_export(tiny_checkpoints, tmp_path):
    from exporter.export.convert import ExportConfig, export_model
    from exporter.export.sources import resolve_model

    result = export_model(resolve_model(str(tiny_checkpoints["llama"])), tmp_path / "fp16", ExportConfig(dtype="fp16"),
                          progress=lambda message: None)
    manifest = read_manifest(result.folder)
    assert manifest.io.kv_dtype == "float16"
    assert all(case["same_argmax"] for case in result.parity["cases"])


def test_corrupt_onnx_file_is_one_clear_error(tiny_bundles, tmp_path):
    import shutil

    from runtime.model import CausalLM

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundles["llama"], broken)
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(KoedgeError, match="onnxruntime cannot load"):
        CausalLM(broken)


@pytest.mark.slow
def test_gemma_export_parity(gemma_bundle):
    manifest = read_manifest(gemma_bundle)
    cases = manifest.passes[0].results["parity"]["cases"]
    assert manifest.model.architecture == "gemma3_text" and manifest.model.sliding_window == 512
    assert any(case["tokens"] > 512 for case in cases)
    assert all(case["max_abs_diff"] < 1e-2 and case["same_argmax"] for case in cases)
    assert manifest.passes[0].results["tied_embedding_shared"]
    assert manifest.weight_bytes() < 1.15e9  # 1.07 GB of weights, stored once (Optimum alone writes 1.74 GB)


def test_llama_tied_through_transpose_is_shared(tmp_path):
    """Optimum ties Llama as MatMul(h, Transpose(E)); onnxruntime would fold that into a second copy."""
    import onnx
    import torch
    from transformers import AutoModelForCausalLM

    from exporter.export.convert import export_model
    from exporter.export.sources import resolve_model
    from tiny_models import tiny_config, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = tiny_config("llama", len(tokenizer))
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    result = export_model(resolve_model(str(tmp_path / "ckpt")), tmp_path / "bundle", progress=lambda m: None)
    model = onnx.load(str(result.folder / "model.onnx"), load_external_data=False)
    embedding = "model.embed_tokens.weight"
    assert not any(node.op_type == "Transpose" and embedding in node.input for node in model.graph.node)
    assert any(node.op_type == "FusedMatMul" and embedding in node.input for node in model.graph.node)
    assert all(case["same_argmax"] for case in result.parity["cases"])
