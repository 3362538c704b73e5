"""INT4 weight-only quantization: layouts onnxruntime agrees with, every algorithm on tiny bundles,
the tied embedding stored once, the CLI and its errors; one slow test on gemma-3-270m."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper, TensorProto

from conftest import requires_data
from exporter.quantize.bundle import quantize_bundle
from exporter.quantize.int4 import Int4Config, dequantize, quantize_weight
from runtime.errors import KoedgeError
from runtime.model import CausalLM

PROMPT = "대한민국의 수도는 서울이다. 오늘 날씨가 정말 좋네요. 이 영화 진짜 재밌어요! 훈민정음은 세종대왕이 만들었다."
QUIET = dict(progress=lambda message: None, evaluate=False)


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def mean_kl(reference: CausalLM, candidate: CausalLM, prompt: str = PROMPT) -> float:
    ids = np.array([reference.encode(prompt)])
    p = log_softmax(reference.step(ids, reference.empty_past()).logits[0].astype(np.float64))
    q = log_softmax(candidate.step(ids, candidate.empty_past()).logits[0].astype(np.float64))
    return float((np.exp(p) * (p - q)).sum(-1).mean())


def greedy(model: CausalLM, steps: int = 8) -> list[int]:
    ids = model.encode(PROMPT)
    out = model.step(np.array([ids]), model.empty_past())
    tokens = []
    for _ in range(steps):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        out = model.step(np.array([[token]]), out.present)
    return tokens


def matmul_nbits_output(packed, x: np.ndarray, n: int) -> np.ndarray:
    """Run one MatMulNBits node over `packed` in onnxruntime."""
    inputs = ["x", "B", "scales"] + (["zp"] if packed.zero_points is not None else [])
    inits = [numpy_helper.from_array(packed.data, "B"), numpy_helper.from_array(packed.scales, "scales")]
    if packed.zero_points is not None:
        inits.append(numpy_helper.from_array(packed.zero_points, "zp"))
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=packed.k, N=n,
                            bits=packed.bits, block_size=packed.block_size)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, packed.k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


# --- block layouts ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algo,bits,symmetric", [("rtn", 4, False), ("rtn", 4, True), ("rtn", 8, True),
                                                 ("k_quant", 4, False), ("k_quant", 8, False), ("hqq", 4, False)])
def test_packed_layout_is_what_matmulnbits_computes(algo, bits, symmetric):
    """K = 80 is not a multiple of the block: padding and nibble order must match onnxruntime's kernel."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(80, 48)).astype(np.float32)
    packed = quantize_weight(w, bits, Int4Config(algo=algo, block_size=32, symmetric=symmetric))
    approx = dequantize(packed)
    assert approx.shape == w.shape
    relative = np.abs(approx - w).mean() / np.abs(w).mean()
    assert relative < (0.12 if bits == 4 else 0.01), relative
    x = rng.normal(size=(1, 80)).astype(np.float32)
    np.testing.assert_allclose(matmul_nbits_output(packed, x, 48), x @ approx, rtol=1e-4, atol=1e-4)


def test_gptq_uses_the_hessian():
    """With inputs that live in a few directions, GPTQ's output error beats plain rounding."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(64, 32)).astype(np.float32)
    x = (rng.normal(size=(512, 8)) @ rng.normal(size=(8, 64))).astype(np.float32)
    hessian = x.T.astype(np.float64) @ x
    config = Int4Config(algo="gptq", block_size=32)
    gptq = dequantize(quantize_weight(w, 4, config, hessian=hessian))
    rtn = dequantize(quantize_weight(w, 4, config, algo="rtn"))
    assert np.linalg.norm(x @ (gptq - w)) < 0.8 * np.linalg.norm(x @ (rtn - w))


# --- bundles --------------------------------------------------------------------------------------------------------

ALGOS = ["rtn", "k_quant", "hqq", pytest.param("gptq", marks=requires_data)]


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("arch", ["gemma3_text", "llama"])
def test_each_algorithm_gives_a_close_loadable_bundle(tiny_bundles, tmp_path, algo, arch):
    config = Int4Config(algo=algo, embedding="int4", int8=[], calib_samples=4, calib_max_length=48, hot_rows=0)
    result = quantize_bundle(tiny_bundles[arch], tmp_path / "q", config, **QUIET)
    reference, quantized = CausalLM(tiny_bundles[arch]), CausalLM(result.folder)
    kl = mean_kl(reference, quantized)
    assert kl < 0.02, kl
    tokens = greedy(quantized)
    assert len(tokens) == 8 and all(0 <= t < quantized.manifest.model.vocab_size for t in tokens)
    record = quantized.manifest.passes[-1]
    assert record.name == "quantize-int4" and record.config["algo"] == algo
    assert record.results["matmuls_int4"] > 0 and record.results["embedding"] == "int4"
    assert not quantized.folder.joinpath("report.json").exists() or json.loads(
        (quantized.folder / "report.json").read_text())["pass"] == "quantize-int4"


def test_int4_is_further_from_fp32_than_int8(tiny_bundles, tmp_path):
    """The KL bound above is not loose: it separates bit widths on the same model."""
    src = tiny_bundles["gemma3_text"]
    four = quantize_bundle(src, tmp_path / "q4", Int4Config(algo="rtn", embedding="int4", block_size=128, int8=[],
                                                            hot_rows=0), **QUIET)
    eight = quantize_bundle(src, tmp_path / "q8", Int4Config(algo="rtn", embedding="int8", block_size=128,
                                                             int8=["/"]), **QUIET)
    reference = CausalLM(src)
    assert mean_kl(reference, CausalLM(eight.folder)) < mean_kl(reference, CausalLM(four.folder)) / 4


def _initializers(folder: Path) -> dict[str, onnx.TensorProto]:
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return {tensor.name: tensor for tensor in model.graph.initializer}, model


@pytest.mark.parametrize("embedding", ["int4", "int8"])
def test_tied_embedding_is_stored_once(tiny_bundles, tmp_path, embedding):
    src = tiny_bundles["gemma3_text"]
    reference = CausalLM(src)
    vocab, hidden = reference.manifest.model.vocab_size, reference.manifest.model.hidden_size
    result = quantize_bundle(src, tmp_path / "q", Int4Config(algo="rtn", embedding=embedding, int8=[], hot_rows=0),
                             **QUIET)
    inits, model = _initializers(result.folder)
    big = [name for name, tensor in inits.items() if tensor.dims and tensor.dims[0] in (vocab, hidden)
           and np.prod(tensor.dims) >= vocab * hidden * (4 if embedding == "int4" else 8) // 8]
    assert len(big) == 1, big  # one quantized table, no float copy
    readers = {node.op_type for node in model.graph.node if big[0] in node.input}
    assert readers == {"GatherBlockQuantized", "MatMulNBits"}
    assert not any(node.op_type in ("Gather", "FusedMatMul") and node.input[0] in inits and
                   len(inits[node.input[0]].dims) == 2 for node in model.graph.node)
    assert result.report["results"]["tied_shared"] is True
    assert mean_kl(reference, CausalLM(result.folder)) < 0.02


@requires_data
@pytest.mark.parametrize("arch", ["gemma3_text", "gpt_neox"])  # tied table, untied embedding + head
def test_hot_rows_are_8_bit_and_back_in_token_order(tiny_bundles, tmp_path, arch):
    """The split table: each token's embedding row and logit come from the half that holds it, in token order."""
    from exporter.quantize.int4 import COLD_BLOCK, WeightReader, _probe_session, find_table, hot_tokens, split_table

    src = tiny_bundles[arch]
    config = Int4Config(algo="rtn", int8=[], hot_rows=40, accuracy_level=0)
    result = quantize_bundle(src, tmp_path / "q", config, **QUIET)
    source = onnx.load(str(src / "model.onnx"), load_external_data=False)
    reader = WeightReader(source, src)
    table = find_table(source, reader)
    vocab = reader.shape(table.weight)[0]
    hot = hot_tokens(src, config, vocab)
    assert result.report["results"]["hot_rows"] == len(hot) == 40
    if table.tied:  # the memory budget counts twice only what the gather reads from the file: the hot rows
        from runtime.bundle import read_manifest
        from runtime.memory import tied_quantized_embedding_bytes

        results = result.report["results"]
        assert 0 < results["tied_gather_bytes"] < results["tied_table_bytes"]
        assert tied_quantized_embedding_bytes(read_manifest(result.folder)) == results["tied_gather_bytes"]

    def expected(matrix: np.ndarray) -> np.ndarray:  # [V, H] as the two halves store it
        split = split_table(matrix, hot, config, "rtn", None, COLD_BLOCK)
        assert (split.hot_packed.bits, split.all_packed.bits, split.all_packed.block_size) == (8, 4, COLD_BLOCK)
        rows = dequantize(split.all_packed).T.copy()
        rows[split.hot] = dequantize(split.hot_packed).T
        return rows

    embedding = expected(np.asarray(reader.array(table.weight)))
    head = embedding if table.tied else expected(np.asarray(reader.array(table.lm_weight)).T)
    cold = np.setdiff1d(np.arange(vocab), hot)
    ids = np.array([[hot[0], cold[0], hot[-1], cold[-1], hot[7], cold[11]]], np.int64)
    quantized = CausalLM(result.folder)
    session = _probe_session(result.folder, [table.gather.output[0], table.lm_head.input[0], "logits"])
    rows, hidden, logits = session.run(None, {**quantized.feeds(ids, 0), **quantized.empty_past()})
    np.testing.assert_allclose(rows[0], embedding[ids[0]], rtol=0, atol=1e-6)
    np.testing.assert_allclose(logits.reshape(-1, vocab), hidden.reshape(-1, hidden.shape[-1]) @ head.T,
                               rtol=1e-4, atol=1e-4)
    bits = sorted(next(a.i for a in node.attribute if a.name == "bits")
                  for node in onnx.load(str(result.folder / "model.onnx"), load_external_data=False).graph.node
                  if node.op_type in ("MatMulNBits", "GatherBlockQuantized") and "_hot" in node.name + node.input[0])
    assert bits and set(bits) == {8}


@requires_data
def test_hot_rows_are_the_frequent_korean_tokens(tiny_bundles):
    from runtime.data import load_texts
    from exporter.quantize.int4 import hot_tokens

    src = tiny_bundles["llama"]
    model = CausalLM(src, open_session=False)
    hot = set(hot_tokens(src, Int4Config(hot_rows=30), model.manifest.model.vocab_size).tolist())
    tokens = model.manifest.tokens
    special = {tokens.bos_token_id, tokens.pad_token_id, *tokens.eos_token_ids} - {None}
    assert special <= hot and len(hot) == 30
    counts = np.bincount([i for text in load_texts("ko", "calib")[:3000] for i in model.encode(text, add_bos=False)],
                         minlength=model.manifest.model.vocab_size)
    assert int(counts.argmax()) in hot
    assert counts[sorted(hot - special)].min() > 0  # only tokens Korean text uses


@requires_data
def test_hot_rows_keep_the_chat_markers(tiny_bundles, tmp_path):
    """A chat bundle's turn markers and end-of-turn ids start every prompt: they stay at 8 bits."""
    import shutil

    from exporter.quantize.int4 import hot_tokens

    src = tmp_path / "chat"
    shutil.copytree(tiny_bundles["llama"], src)
    manifest = json.loads((src / "koedge.json").read_text())
    vocab = manifest["model"]["vocab_size"]
    manifest["tokens"]["chat_format"] = {"first_user_prefix": "<s>~~", "assistant_prefix": "~~",
                                         "next_user_prefix": "~~", "end_of_turn_ids": [vocab - 1]}
    (src / "koedge.json").write_text(json.dumps(manifest))
    marker = CausalLM(src, open_session=False).encode("~~", add_bos=False)
    hot = set(hot_tokens(src, Int4Config(hot_rows=8), vocab).tolist())
    assert vocab - 1 in hot and set(marker) <= hot


def test_untied_embedding_and_head_are_quantized(tiny_bundles, tmp_path):
    src = tiny_bundles["gpt_neox"]
    result = quantize_bundle(src, tmp_path / "q", Int4Config(algo="rtn", embedding="int8"), **QUIET)
    inits, model = _initializers(result.folder)
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and "FusedMatMul" not in ops
    assert not any(t.data_type == TensorProto.FLOAT and len(t.dims) == 2 and min(t.dims) > 16 for t in inits.values())
    assert result.report["results"]["tied_shared"] is False
    assert mean_kl(CausalLM(src), CausalLM(result.folder)) < 0.02


def test_mixed_precision_counts_int8_matmuls(tiny_bundles, tmp_path):
    config = Int4Config(algo="k_quant", int8=["down_proj", "v_proj"])
    result = quantize_bundle(tiny_bundles["llama"], tmp_path / "q", config, **QUIET)
    results = result.report["results"]
    assert results["matmuls_int8"] == 4 and all("down_proj" in n or "v_proj" in n for n in results["int8_matmuls"])
    _, model = _initializers(result.folder)
    bits = {next(a.i for a in node.attribute if a.name == "bits") for node in model.graph.node
            if node.op_type == "MatMulNBits" and "down_proj" in node.name}
    assert bits == {8}


@requires_data
def test_block_sizes_per_matmul_and_for_the_hot_rows(tiny_bundles, tmp_path):
    """`blocks` gives some MatMuls their own block size (packing keeps different blocks apart) and
    `hot_block_size` the table's 8-bit rows theirs; the bundle stays close to FP32."""
    src = tiny_bundles["gemma3_text"]
    config = Int4Config(algo="rtn", block_size=64, blocks={"down_proj": 32}, hot_rows=40, hot_block_size=32)
    result = quantize_bundle(src, tmp_path / "q", config, **QUIET)
    _, model = _initializers(result.folder)
    blocks = {node.name: next(a.i for a in node.attribute if a.name == "block_size")
              for node in model.graph.node if node.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    layers = {name: block for name, block in blocks.items() if "/layers." in name}
    assert {block for name, block in layers.items() if "down_proj" in name} == {32}
    assert {block for name, block in layers.items() if "down_proj" not in name} == {64}
    hot = {block for name, block in blocks.items() if name.endswith("_hot_Q")}
    assert hot == {32}
    assert mean_kl(CausalLM(src), CausalLM(result.folder)) < 0.02
    with pytest.raises(KoedgeError, match="block sizes"):
        quantize_bundle(src, tmp_path / "bad", Int4Config(algo="rtn", blocks={"down_proj": 48}), **QUIET)


# --- errors ------------------------------------------------------------------------------------------------------------

def test_quantizing_a_quantized_bundle_is_refused(tiny_bundles, tmp_path):
    first = quantize_bundle(tiny_bundles["llama"], tmp_path / "q", Int4Config(algo="rtn", int8=[]), **QUIET)
    with pytest.raises(KoedgeError, match="already quantized"):
        quantize_bundle(first.folder, tmp_path / "qq", Int4Config(algo="rtn"), **QUIET)
    assert not (tmp_path / "qq").exists()


@pytest.mark.parametrize("config,message", [
    (Int4Config(block_size=48), "block size 48"), (Int4Config(algo="awq"), "unknown INT4 algorithm"),
    (Int4Config(algo="hqq", symmetric=True), "symmetric"), (Int4Config(embedding="int2"), "embedding precision")])
def test_bad_configs_are_refused(tiny_bundles, tmp_path, config, message):
    with pytest.raises(KoedgeError, match=message):
        quantize_bundle(tiny_bundles["llama"], tmp_path / "q", config, **QUIET)
    assert not (tmp_path / "q").exists()


def test_cli_quantize_int4(tiny_bundles, tmp_path, capsys):
    from exporter.cli import main

    out = tmp_path / "q"
    assert main(["quantize", str(tiny_bundles["qwen2"]), "--int4", "--algo", "rtn", "--block-size", "64",
                 "--int8-matmuls", "down_proj", "--blocks", "down_proj=32", "--out", str(out), "--no-eval"]) == 0
    assert "quantize-int4" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["block_size"] == 64 and report["bytes_after"] < report["bytes_before"]
    assert report["config"]["int8"] == ["down_proj"] and report["results"]["matmuls_int8"] == 2
    assert report["config"]["blocks"] == {"down_proj": 32}
    assert main(["quantize", str(tiny_bundles["qwen2"]), "--int4", "--blocks", "down_proj", "--out",
                 str(tmp_path / "bad"), "--no-eval"]) == 1
    assert "FRAGMENT=SIZE" in capsys.readouterr().err
    assert (out / "report.md").read_text().startswith("# quantize-int4")
    assert main(["quantize", str(tiny_bundles["qwen2"]), "--int4", "--out", str(out), "--no-eval"]) == 1
    assert "exists" in capsys.readouterr().err
    assert main(["quantize", str(out), "--int4", "--out", str(tmp_path / "again"), "--no-eval"]) == 1
    assert "already quantized" in capsys.readouterr().err


@requires_data
def test_report_measures_accuracy(tiny_bundles, tmp_path):
    from runtime.evaluate import EvalConfig

    result = quantize_bundle(tiny_bundles["gemma3_text"], tmp_path / "q", Int4Config(algo="rtn"),
                             progress=lambda message: None, eval_config=EvalConfig(max_samples=3))
    accuracy = result.report["accuracy"]
    assert accuracy["quantized"]["kl_mean"] >= 0 and 0 <= accuracy["quantized"]["same_top1"] <= 1
    assert accuracy["source"]["perplexity"] > 1
    table = (result.folder / "report.md").read_text()
    assert "perplexity" in table and "same top-1" in table
    assert CausalLM(result.folder).manifest.passes[-1].results["accuracy"]["kl_mean"] is not None


# --- gemma-3-270m --------------------------------------------------------------------------------------------------

@pytest.mark.slow
@requires_data
def test_gemma_int4_default_meets_targets(gemma_bundle, tmp_path):
    """The default recipe on gemma-3-270m: PPL <= +5%, mean KL <= 0.05, same-top-1 >= 90%, bundle <= 250 MB
    (issue 16's targets; the 4-bit table without its Korean rows at 8 bits measured +12% and KL 0.14)."""
    from runtime.evaluate import EvalConfig

    result = quantize_bundle(gemma_bundle, tmp_path / "gemma-int4", Int4Config(), progress=lambda message: None,
                             eval_config=EvalConfig(max_samples=8))
    report = result.report
    source, quantized = report["accuracy"]["source"], report["accuracy"]["quantized"]
    assert report["bytes_after"] <= 250e6, report["bytes_after"]
    assert quantized["perplexity"] <= 1.05 * source["perplexity"], (quantized["perplexity"], source["perplexity"])
    assert quantized["kl_mean"] <= 0.05, quantized["kl_mean"]
    assert quantized["same_top1"] >= 0.90, quantized["same_top1"]


def test_tied_head_written_as_transpose_is_shared(tmp_path):
    """Optimum may write a tied LM head as MatMul(h, Transpose(E)): it is shared the same way."""
    import torch
    from transformers import AutoModelForCausalLM

    from exporter.export.convert import export_model
    from exporter.export.sources import resolve_model
    from tiny_models import tiny_config, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = tiny_config("llama", len(tokenizer))
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "ck")
    tokenizer.save_pretrained(tmp_path / "ck")
    src = tmp_path / "fp32"
    export_model(resolve_model(str(tmp_path / "ck")), src, progress=lambda message: None)
    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    # Whatever form the export chose, the quantized graph must read one table.
    forms = {node.op_type for node in model.graph.node if node.op_type in ("FusedMatMul", "Transpose")}
    result = quantize_bundle(src, tmp_path / "q", Int4Config(algo="rtn", int8=[], embedding="int4", hot_rows=0),
                             **QUIET)
    inits, quantized = _initializers(result.folder)
    table = [name for name in inits if name.endswith("_Q4") and inits[name].dims[0] == config.vocab_size]
    assert len(table) == 1, (forms, table)
    assert {node.op_type for node in quantized.graph.node if table[0] in node.input} == {
        "GatherBlockQuantized", "MatMulNBits"}
    assert result.report["results"]["tied_shared"] is True
    assert mean_kl(CausalLM(src), CausalLM(result.folder)) < 0.02


@requires_data
@pytest.mark.parametrize("embedding", ["int8", "fp32"])
def test_cli_gptq_with_no_int8_matmuls(tiny_bundles, tmp_path, embedding):
    """GPTQ's probe graph drops the LM head when the table is not 4-bit; the optional logits_to_keep
    input (an initializer default) must survive that, or the calibration feeds are refused."""
    from exporter.cli import main

    out = tmp_path / "q"
    assert main(["quantize", str(tiny_bundles["llama"]), "--int4", "--int8-matmuls", "", "--embedding", embedding,
                 "--calib-samples", "4", "--calib-max-length", "48", "--out", str(out), "--no-eval"]) == 0
    results = json.loads((out / "report.json").read_text())["results"]
    assert results["matmuls_int8"] == 0 and results["matmuls_int4"] > 0
    assert mean_kl(CausalLM(tiny_bundles["llama"]), CausalLM(out)) < 0.02


def test_hot_rows_without_korean_text_is_one_clear_error(tiny_bundles, tmp_path, monkeypatch):
    monkeypatch.setenv("KOEDGE_DATA", str(tmp_path / "no-data"))
    with pytest.raises(KoedgeError, match="--hot-rows 0"):
        quantize_bundle(tiny_bundles["gemma3_text"], tmp_path / "q", Int4Config(algo="rtn", int8=[]), **QUIET)
    assert not (tmp_path / "q").exists()
