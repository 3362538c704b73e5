"""The accuracy instrument: hand-checked numbers on a model whose logits are known, self-KL of zero,
a perturbed model's KL above zero, deterministic results, and clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import requires_data
from runtime.errors import KoedgeError
from runtime.evaluate import (EvalConfig, eval_texts, evaluate, format_table, kl_rows, log_softmax,
                              passages_from, percentile, shared_vocab, windows)
from runtime.model import CausalLM
from runtime.tasks import choice_logprobs, nsmc_examples, run_task, wilson

TEXTS = ["대한민국의 수도는 서울이다. 서울은 한강을 끼고 있다.", "이 영화 진짜 재밌어요! 강추합니다.",
         "훈민정음은 1443년 세종대왕이 창제하였다.", "배가 고파서 김치찌개를 먹었다."]
BYTE_TOKENS = 256  # the fixed model's tokenizer: one token per UTF-8 byte, then <s> and </s>


# --- a bundle with known logits: the same bias vector at every position ----------------------
def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    vocab.update({"<s>": BYTE_TOKENS, "</s>": BYTE_TOKENS + 1})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def fixed_bundle(folder: Path, bias: np.ndarray) -> Path:
    """An ONNX 'model' whose logits are `bias` at every position, with a manifest and byte tokenizer."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from runtime.bundle import IOContract, Manifest, ModelInfo, SpecialTokens, TensorSpec, write_manifest

    width = len(bias)
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids_float"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["ids_float", "zero"], ["zeros"]),
             helper.make_node("Unsqueeze", ["zeros", "last_axis"], ["zeros3d"]),
             helper.make_node("Add", ["zeros3d", "bias"], ["logits"])]
    graph = helper.make_graph(
        nodes, "fixed",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", width])],
        [numpy_helper.from_array(np.zeros((), np.float32), "zero"),
         numpy_helper.from_array(np.array([-1], np.int64), "last_axis"),
         numpy_helper.from_array(bias.astype(np.float32), "bias")])
    folder.mkdir(parents=True)
    onnx.save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)]), folder / "model.onnx")
    byte_tokenizer().save(str(folder / "tokenizer.json"))
    io = IOContract(inputs=[TensorSpec("input_ids", "int64", ["batch", "sequence"]),
                            TensorSpec("attention_mask", "int64", ["batch", "total"])],
                    outputs=[TensorSpec("logits", "float32", ["batch", "sequence", width])])
    info = ModelInfo(name=folder.name, source="test", revision=None, architecture="fixed", num_layers=0,
                     num_attention_heads=1, num_kv_heads=1, head_dim=1, hidden_size=1, vocab_size=width,
                     max_positions=1 << 20, parameters=width)
    write_manifest(folder, Manifest(model=info, tokens=SpecialTokens(BYTE_TOKENS, [BYTE_TOKENS + 1], None),
                                    io=io, onnx_file="model.onnx"))
    return folder


@pytest.fixture(scope="module")
def uniform(tmp_path_factory) -> CausalLM:
    return CausalLM(fixed_bundle(tmp_path_factory.mktemp("fixed") / "uniform", np.zeros(BYTE_TOKENS + 2)))


@pytest.fixture(scope="module")
def tilted(tmp_path_factory) -> tuple[CausalLM, np.ndarray]:
    bias = np.zeros(BYTE_TOKENS + 2)
    bias[5:10] = 2.0  # argmax 5, where the uniform model's argmax is 0
    return CausalLM(fixed_bundle(tmp_path_factory.mktemp("fixed") / "tilted", bias)), bias


# --- numerics ------------------------------------------------------------------------------------
def test_kl_and_log_softmax_by_hand():
    p, q = np.log([[0.5, 0.5]]), np.log([[0.9, 0.1]])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # 0.5108 nats
    assert kl_rows(p, q)[0] == pytest.approx(expected, rel=1e-6)
    assert kl_rows(p, p)[0] == 0.0
    assert np.exp(log_softmax(np.array([[1.0, 2.0, 3.0]]))).sum() == pytest.approx(1.0)
    assert log_softmax(np.array([[0.0, math.log(3.0)]]))[0, 1] == pytest.approx(math.log(0.75))


def test_percentile_interpolates_like_llama_cpp():
    values = np.arange(101, dtype=float)  # fraction * (n - 1) lands exactly on index 99
    assert percentile(values, 0.99) == 99.0
    assert percentile(np.array([0.0, 1.0]), 0.99) == pytest.approx(0.99)


@pytest.mark.parametrize("n_tokens,window", [(5, 8), (8, 8), (9, 8), (40, 8), (41, 9), (1000, 256)])
def test_windows_score_each_token_once_with_half_window_context(n_tokens, window):
    scored = []
    for begin, end, first in windows(n_tokens, window):
        assert end - begin <= window and first >= begin
        if begin > 0:
            assert first - begin >= window // 2  # each later-scored token sees at least half a window
        scored.extend(range(first, end))
    assert scored == list(range(n_tokens))


def test_wilson_interval():
    low, high = wilson(8, 10)  # textbook value: 0.490–0.943
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)
    assert wilson(0, 20)[0] == 0.0 and wilson(20, 20)[1] == 1.0


def test_passages_are_whole_texts_within_the_byte_budget():
    texts = ["가" * 10, "나" * 10, "다" * 10, "라" * 10]  # 30 bytes each
    first, second = "가" * 10 + "\n" + "나" * 10, "다" * 10 + "\n" + "라" * 10  # 61 bytes each
    assert passages_from(texts, 61, 10) == [first, second]
    assert passages_from(texts, 61, 1) == [first]
    assert passages_from(texts, 70, 10) == [first, second]
    assert passages_from(texts[:3], 61, 10) == [first]  # a 30-byte tail is a scrap, not a passage
    assert passages_from(texts, 1000, 3) == ["\n".join(texts)]  # too few texts: keep what there is
    assert passages_from(["가" * 40, "나"], 61, 10) == ["가" * 40]  # a long text stands alone


def test_shared_vocab_by_token_map():
    ref_index, cand_index = shared_vocab(6, None, 3, np.array([4, 1, 5]))
    assert ref_index.tolist() == [1, 4, 5] and cand_index.tolist() == [1, 0, 2]
    assert shared_vocab(4, None, 4, None) is None
    with pytest.raises(KoedgeError, match="share no tokens"):
        shared_vocab(2, None, 2, np.array([7, 8]))


# --- hand-checked end to end on the fixed-logit bundles ------------------------------------------
def test_uniform_model_bits_per_byte_is_log2_vocab(uniform):
    width = BYTE_TOKENS + 2
    long_text = "가나다라마바사 " * 40  # 880 bytes: slides a 64-token window
    for texts, window in ((TEXTS, 256), ([long_text], 64)):
        result = evaluate(uniform, texts, config=EvalConfig(window=window), show_progress=False)
        n_bytes = sum(len(text.encode()) for text in texts)
        assert result.bytes == n_bytes and result.tokens == n_bytes  # one token per byte, every byte scored
        assert result.bits_per_byte == pytest.approx(math.log2(width), rel=1e-6)
        assert result.perplexity == pytest.approx(width, rel=1e-5)


def test_fixed_models_by_hand(uniform, tilted):
    model, bias = tilted
    probabilities = np.exp(bias) / np.exp(bias).sum()
    uniform_p = np.full(len(bias), 1 / len(bias))
    expected_kl = float(np.sum(uniform_p * np.log(uniform_p / probabilities)))
    result = evaluate(model, TEXTS, reference=uniform, show_progress=False)
    assert result.kl_mean == pytest.approx(expected_kl, rel=1e-5)
    assert result.kl_p99 == pytest.approx(expected_kl, rel=1e-5)
    assert result.same_top1 == 0.0 and result.kl_positions == result.tokens
    ids = [i for text in TEXTS for i in model.encode(text, add_bos=False)]
    n_bytes = sum(len(text.encode()) for text in TEXTS)
    assert result.bits_per_byte == pytest.approx(-np.log2(probabilities[ids]).sum() / n_bytes, rel=1e-5)
    assert result.vocab_note is None
    assert result.reference_bits_per_byte == pytest.approx(math.log2(len(bias)), rel=1e-6)  # the uniform one


def test_pruned_vocab_compares_on_shared_tokens(uniform, tmp_path):
    """A candidate with fewer logits and a token map: KL on the shared tokens, renormalized, and said so."""
    import shutil

    wide = CausalLM(fixed_bundle(tmp_path / "wide", np.zeros(300)))  # the same tokens plus 42 more logits
    narrow = tmp_path / "narrow"
    shutil.copytree(uniform.folder, narrow)
    (narrow / "token_map.json").write_text(json.dumps({"new_to_original": list(range(BYTE_TOKENS + 2))}))
    result = evaluate(CausalLM(narrow), TEXTS, reference=wide, show_progress=False)
    assert result.kl_mean == pytest.approx(0.0, abs=1e-6)  # uniform on the 258 shared tokens either way
    assert result.same_top1 == 1.0
    assert "258 shared tokens" in result.vocab_note and "14.00%" in result.vocab_note


def test_kl_stops_where_tokenizations_part(uniform, tilted):
    """When the candidate segments a passage differently, KL covers only positions with the same context."""
    model, bias = tilted
    candidate = CausalLM(model.folder)
    changed = TEXTS[1]
    honest = candidate.encode

    def encode(text: str, add_bos: bool = True) -> list[int]:
        ids = honest(text, add_bos)
        return ids[:5] + [0] + ids[6:] if text == changed else ids

    candidate.encode = encode
    result = evaluate(candidate, TEXTS, reference=uniform, show_progress=False)
    n_changed = len(changed.encode())
    assert result.kl_positions == result.tokens - (n_changed - 6)  # rows 0..5 of that passage still compare
    assert "1 of 4 passages are tokenized differently" in result.vocab_note
    assert result.reference_perplexity is None  # not every reference token was scored
    probabilities = np.exp(bias) / np.exp(bias).sum()
    uniform_p = np.full(len(bias), 1 / len(bias))
    assert result.kl_mean == pytest.approx(float(np.sum(uniform_p * np.log(uniform_p / probabilities))), rel=1e-5)


# --- tiny exported models ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def perturbed_llama(tmp_path_factory) -> Path:
    """The tiny llama with another seed: same tokenizer and shapes, different weights."""
    from exporter.export.convert import export_model
    from exporter.export.sources import resolve_model
    from tiny_models import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("perturbed")
    checkpoint = make_tiny_checkpoint("llama", root / "checkpoint", seed=1)
    export_model(resolve_model(str(checkpoint)), root / "bundle", progress=lambda message: None)
    return root / "bundle"


def test_self_kl_is_zero_and_numbers_are_deterministic(tiny_bundles):
    model, again = CausalLM(tiny_bundles["llama"]), CausalLM(tiny_bundles["llama"])
    config = EvalConfig(window=16)  # the tiny tokenizer makes ~40 tokens per text: slide too
    first = evaluate(model, TEXTS, reference=again, config=config, show_progress=False)
    assert first.kl_mean == 0.0 and first.kl_max == 0.0 and first.same_top1 == 1.0
    assert first.reference_perplexity == first.perplexity
    assert first.reference_bits_per_byte == first.bits_per_byte
    second = evaluate(model, TEXTS, reference=again, config=config, show_progress=False)
    first.seconds = second.seconds = 0.0
    assert first.to_dict() == second.to_dict()
    assert math.isfinite(first.perplexity) and first.bits_per_byte > 0


def test_perturbed_model_has_positive_kl(tiny_bundles, perturbed_llama):
    result = evaluate(CausalLM(perturbed_llama), TEXTS, reference=CausalLM(tiny_bundles["llama"]),
                      show_progress=False)
    assert result.kl_mean > 1e-3 and result.kl_p99 >= result.kl_mean
    assert result.same_top1 < 1.0
    table = format_table([("perturbed", result)])
    assert "perturbed" in table and f"{result.kl_mean:.4f}" in table


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt_neox"])
def test_choice_scoring_matches_one_full_pass(tiny_bundles, arch):
    """Prefill + decode steps (the task path) give the same log-likelihood as one pass over prompt + answer."""
    model = CausalLM(tiny_bundles[arch])
    prompt = "다음 영화 리뷰가 긍정적인지 부정적인지 판단하세요.\n리뷰: 이 영화 진짜 재밌어요!\n감정:"
    choices = (" 긍정", " 부정적이다")
    scores = choice_logprobs(model, prompt, choices)
    prompt_ids = model.encode(prompt, add_bos=False)
    for choice, score in zip(choices, scores):
        ids = model.encode(choice, add_bos=False)
        logits = model.step(np.array([[model.manifest.tokens.bos_token_id, *prompt_ids, *ids]]),
                            model.empty_past()).logits[0]
        rows = log_softmax(logits[len(prompt_ids): len(prompt_ids) + len(ids)])
        assert score == pytest.approx(float(rows[np.arange(len(ids)), ids].sum()), abs=1e-3)


# --- errors --------------------------------------------------------------------------------------
def test_errors(tiny_bundles, uniform, tmp_path):
    model = CausalLM(tiny_bundles["llama"])
    with pytest.raises(KoedgeError, match="not found"):
        eval_texts(EvalConfig(data=str(tmp_path / "missing.txt")))
    (empty := tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(KoedgeError, match="holds no text"):
        eval_texts(EvalConfig(data=str(empty)))
    with pytest.raises(KoedgeError, match="empty"):
        evaluate(model, ["", ""], show_progress=False)
    with pytest.raises(KoedgeError, match="tokenizes the text differently"):
        evaluate(model, TEXTS, reference=uniform, show_progress=False)
    with pytest.raises(KoedgeError, match="unknown task"):
        run_task(model, "hellaswag")


def test_cli_reports_errors_in_one_line(tiny_bundles, tmp_path, capsys):
    from exporter.cli import main

    assert main(["eval", str(tiny_bundles["llama"]), "--data", str(tmp_path / "none.txt"), "--quiet"]) == 1
    assert main(["eval", str(tiny_bundles["llama"]), "--tasks", "sst2", "--quiet"]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("koedge: error:") for line in errors)


def test_cli_on_a_file(tiny_bundles, tmp_path, capsys):
    from exporter.cli import main

    (texts := tmp_path / "texts.txt").write_text("\n".join(TEXTS * 3), encoding="utf-8")
    bundle = str(tiny_bundles["llama"])
    assert main(["eval", bundle, "--reference", bundle, "--data", str(texts), "--tasks", "none",
                 "--tokens-per-sample", "16", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["result"]["kl_mean"] == 0.0 and report["result"]["passages"] >= 2
    assert main(["eval", bundle, "--data", str(texts), "--tasks", "none", "--quiet"]) == 0
    assert "| bundle | PPL | bits/byte" in capsys.readouterr().out


# --- the real data -------------------------------------------------------------------------------
@requires_data
def test_eval_passages_are_fixed_eval_split_text():
    from runtime.data import load_texts

    config = EvalConfig(max_samples=4)
    passages = eval_texts(config)
    assert passages == eval_texts(config) and len(passages) == 4
    assert all(len(p.encode()) <= 256 * 3.5 for p in passages)
    eval_split = set(load_texts("ko", "eval"))
    assert all(line in eval_split for p in passages for line in p.split("\n"))


@requires_data
def test_nsmc_sample_is_balanced_and_fixed(tiny_bundles):
    examples = nsmc_examples(20)
    assert [e.answer for e in examples] == [0, 1] * 10 and examples == nsmc_examples(20)
    result = run_task(CausalLM(tiny_bundles["llama"]), "nsmc", samples=4, show_progress=False)
    assert result.total == 4 and result.ci_low <= result.accuracy <= result.ci_high


@requires_data
def test_klue_nli_sample(tiny_bundles):
    result = run_task(CausalLM(tiny_bundles["qwen2"]), "klue-nli", samples=6, show_progress=False)
    assert result.total == 6 and result.chance == pytest.approx(1 / 3)


@pytest.mark.slow
@requires_data
def test_gemma_fp32_perplexity_is_sane(gemma_bundle):
    model = CausalLM(gemma_bundle)
    config = EvalConfig(max_samples=8)
    result = evaluate(model, eval_texts(config), config=config, show_progress=False)
    assert result.passages == 8 and 1500 < result.tokens < 2300
    assert 5 < result.perplexity < 200 and 0.5 < result.bits_per_byte < 2.5
