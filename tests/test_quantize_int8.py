"""Static INT8: loadable bundles close to FP32, the tied matrix stored once, float switches that
match the graph they stand for, exact SmoothQuant migration; and the real gemma-3-270m targets."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import requires_data
from exporter.quantize.calibration import CalibrationConfig, build_sequences
from exporter.quantize.int8 import (Int8StaticConfig, activation_pairs, channel_absmax, compare,
                                    holdout_reference, keep_float, quantize_int8_static, smooth_work_model,
                                    write_work_bundle)
from runtime.bundle import read_manifest, write_manifest
from runtime.errors import KoedgeError
from runtime.model import CausalLM
from tiny_models import KOREAN_LINES


def tiny_config(lines: Path, **changes) -> Int8StaticConfig:
    calibration = CalibrationConfig(source=str(lines), samples=6, holdout=2, min_length=8, max_length=48,
                                    decode_steps=3)
    return Int8StaticConfig(calibration=calibration, target_same_top1=0.0, **changes)


@pytest.fixture(scope="module")
def lines(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("int8-data") / "calib.txt"
    path.write_text("\n".join(KOREAN_LINES * 6), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def quantized(tiny_bundles, lines, tmp_path_factory):
    """Plain (no search) INT8 bundles, made once per architecture for the tests that only read them."""
    made: dict[str, tuple[Path, dict]] = {}

    def get(arch: str) -> tuple[Path, dict]:
        if arch not in made:
            out = tmp_path_factory.mktemp(f"int8-{arch}") / "bundle"
            made[arch] = out, quantize(tiny_bundles[arch], out, tiny_config(lines, accuracy_aware=False))
        return made[arch]
    return get


def quantize(src: Path, out: Path, config: Int8StaticConfig) -> dict:
    """What the `koedge quantize` caller does around the pass: tokenizer + manifest."""
    results = quantize_int8_static(src, out, config, progress=lambda message: None)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    write_manifest(out, read_manifest(src))
    return results


def divergence(reference: CausalLM, candidate: CausalLM, texts: list[str]) -> tuple[float, float]:
    """(mean KL, same-top-1) of candidate vs reference over every position of the texts."""
    kls, same, count = [], 0, 0
    for text in texts:
        ids = np.array([reference.encode(text)])
        p = reference.step(ids, reference.empty_past()).logits[0].astype(np.float64)
        q = candidate.step(ids, candidate.empty_past()).logits[0].astype(np.float64)
        p -= np.log(np.exp(p - p.max(-1, keepdims=True)).sum(-1, keepdims=True)) + p.max(-1, keepdims=True)
        q -= np.log(np.exp(q - q.max(-1, keepdims=True)).sum(-1, keepdims=True)) + q.max(-1, keepdims=True)
        kls.extend((np.exp(p) * (p - q)).sum(-1))
        same += int((p.argmax(-1) == q.argmax(-1)).sum())
        count += len(p)
    return float(np.mean(kls)), same / count


def op_counts(folder: Path) -> dict[str, int]:
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.parametrize("arch", ["gemma3_text", "llama"])
def test_int8_static_tiny_bundle_stays_close(tiny_bundles, quantized, arch):
    src, (out, results) = tiny_bundles[arch], quantized(arch)
    counts = op_counts(out)
    assert counts.get("QuantizeLinear", 0) == results["activations_int8"] > 0
    assert counts["MatMulNBits"] == 1 and counts["GatherBlockQuantized"] == 1
    assert counts["DequantizeLinear"] > counts["QuantizeLinear"]  # weights are stored INT8 behind a DQ
    assert results["calibration"]["feeds"] == 6 * 4
    assert not any(path.name.startswith(".koedge-int8-") for path in out.iterdir())  # work folder cleaned up
    fp32, int8 = CausalLM(src), CausalLM(out)
    kl, same = divergence(fp32, int8, KOREAN_LINES[:4])
    assert kl < 0.02 and same > 0.8


def test_tied_matrix_is_stored_once(tiny_bundles, quantized):
    src, (out, results) = tiny_bundles["gemma3_text"], quantized("gemma3_text")
    manifest = read_manifest(src)
    vocab, hidden = manifest.model.vocab_size, manifest.model.hidden_size
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    big = [t for t in model.graph.initializer if np.prod(t.dims) == vocab * hidden]
    assert len(big) == 1 and big[0].data_type == onnx.TensorProto.UINT8
    readers = [node.op_type for node in model.graph.node if big[0].name in node.input]
    assert sorted(readers) == ["GatherBlockQuantized", "MatMulNBits"]
    assert results["head"]["tied_embedding_shared"] is True


def test_untied_head_gets_its_own_int8_tensor(quantized):
    out, results = quantized("llama")
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    uint8 = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.UINT8 and len(t.dims) == 3]
    assert len(uint8) == 2 and results["head"]["tied_embedding_shared"] is False


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_methods(tiny_bundles, lines, tmp_path, method):
    src, out = tiny_bundles["qwen2"], tmp_path / "int8"
    results = quantize(src, out, tiny_config(lines, method=method, accuracy_aware=False))
    assert results["method"] == method
    kl, _ = divergence(CausalLM(src), CausalLM(out), KOREAN_LINES[:3])
    assert kl < 0.05


def test_accuracy_search_reports_and_keeps_float(tiny_bundles, lines, tmp_path):
    """An unreachable target makes the search keep its maximum number of groups in float; the
    written graph then scores on the held-out positions what the switched graph measured."""
    src, out = tiny_bundles["gemma3_text"], tmp_path / "int8"
    config = tiny_config(lines, target_ppl_increase=-1.0, max_float_groups=2, min_kl_gain=-1.0)  # keep both
    results = quantize(src, out, config)
    search = results["search"]
    assert not search["met"] and len(search["steps"]) == 2
    assert set(search["sensitivity"]) >= {"layer 0", "layer 1", "layer 2"}
    assert any(name.startswith("kind ") for name in search["sensitivity"])
    assert 0 < results["activations_float"] < results["activations_float"] + results["activations_int8"]
    assert results["kept_float"] and op_counts(out).get("QuantizeLinear", 0) == results["activations_int8"]

    written = CausalLM(out)
    _, holdout = build_sequences(written, config.calibration)
    reference = holdout_reference(src, holdout, config.judged_positions, threads=0)
    logits = [written.step(np.array([ids]), written.empty_past()).logits[0, chosen]
              for ids, chosen in zip(reference.sequences, reference.positions)]
    measured = compare(reference, logits)
    assert results["heldout"] == {key: search["steps"][-1][key] for key in results["heldout"]}
    assert measured["kl_mean"] == pytest.approx(results["heldout"]["kl_mean"], rel=0.2, abs=2e-4)


def test_keep_float_everywhere_leaves_weight_only_int8(quantized):
    out, _ = quantized("gemma3_text")
    model = onnx.load(str(out / "model.onnx"))
    keep_float(model, {pair.tensor for pair in activation_pairs(model)})
    assert not activation_pairs(model)
    assert not any(node.op_type == "QuantizeLinear" for node in model.graph.node)
    assert sum(node.op_type == "DequantizeLinear" for node in model.graph.node) > 0


def test_smoothquant_migration_is_exact(tiny_bundles, lines, tmp_path):
    src = tiny_bundles["gemma3_text"]
    work = write_work_bundle(src, tmp_path, smooth=True, progress=lambda message: None)
    assert len(work.smoothable) == 3 * 3  # per layer: q/k/v input, gate/up input, down input
    runner = CausalLM(tmp_path)
    sequences, _ = build_sequences(runner, tiny_config(lines).calibration)
    ids = np.array([sequences[0].ids])
    before = runner.step(ids, runner.empty_past()).logits
    maxima = channel_absmax(runner, sequences, len(work.smoothable))
    del runner
    report = smooth_work_model(work, maxima, alpha=0.5)
    after = CausalLM(tmp_path).step(ids, CausalLM(tmp_path).empty_past()).logits
    np.testing.assert_allclose(after, before, rtol=1e-3, atol=1e-3)
    assert report["max_over_median_after"] < report["max_over_median_before"]


def test_bad_method():
    with pytest.raises(KoedgeError, match="unknown calibration method"):
        Int8StaticConfig(method="kl").check()



@pytest.mark.slow
@requires_data
def test_gemma_int8_static_meets_targets(gemma_bundle, tmp_path):
    """The default INT8-static pass on gemma-3-270m: PPL <= +10% and same-top-1 >= 85% (issue 4's must)."""
    from exporter.quantize.bundle import quantize_bundle
    from runtime.evaluate import EvalConfig

    result = quantize_bundle(gemma_bundle, tmp_path / "gemma-int8", Int8StaticConfig(), progress=lambda message: None,
                             eval_config=EvalConfig(max_samples=8))
    source, quantized = result.report["accuracy"]["source"], result.report["accuracy"]["quantized"]
    assert quantized["perplexity"] <= 1.10 * source["perplexity"], (quantized["perplexity"], source["perplexity"])
    assert quantized["same_top1"] >= 0.85, quantized["same_top1"]
    assert result.report["bytes_after"] < 0.35 * result.report["bytes_before"]
