"""Pruning: vocabulary (exact round trip, same segmentation), structured surgery (equals masking,
shapes shrink in ONNX), sparsity, the sensitivity report, and the errors a user can cause."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import requires_data
from runtime.errors import KoedgeError
from tiny_models import KOREAN_LINES, tiny_tokenizer

HELD_OUT = ["서울은 한강을 끼고 있다.", "김치찌개 맛있어요!!", "GPU 없이 phone 에서 돌려요 123", "쀍 🎉 x\ty  z",
            "\u3131\u314f 漢字 ñ", "   leading and trailing  "]


def random_texts(count: int, seed: int = 0) -> list[str]:
    """Random Unicode (no surrogates; no U+2581, which the Gemma decoder maps to a space by design)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        chars = [chr(rng.choice([rng.randint(32, 0x2FFF), rng.randint(0xAC00, 0xD7A3), rng.randint(0x1F300, 0x1FAFF),
                                 rng.randint(0, 0x10FFFF)])) for _ in range(rng.randint(1, 24))]
        texts.append("".join(c for c in chars if not 0xD800 <= ord(c) <= 0xDFFF and c != "\u2581"))
    return texts


def gemma_like_tokenizer(kind: str) -> dict:
    """A tiny tokenizer.json shaped like Gemma's: ' ' -> '▁', byte fallback pieces <0x00>..<0xFF>.
    kind 'unigram' mirrors the packaged gemma-3-270m tokenizer; 'bpe' the sentencepiece-BPE variant."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    if kind == "bpe":
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=specials, show_progress=False)
    else:
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=160, special_tokens=specials, unk_token="<unk>",
                                          show_progress=False)
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.train_from_iterator(KOREAN_LINES * 20, trainer=trainer)
    data = json.loads(tok.to_str())
    model = data["model"]
    pieces = [f"<0x{b:02X}>" for b in range(256)]
    if kind == "bpe":
        model["vocab"].update({piece: len(model["vocab"]) + i for i, piece in enumerate(pieces)})
    else:
        model["vocab"] += [[piece, 0.0] for piece in pieces]
    model["byte_fallback"] = True
    return data


def byte_level_tokenizer() -> dict:
    return json.loads(tiny_tokenizer().backend_tokenizer.to_str())


TOKENIZERS = {"unigram-byte-fallback": lambda: gemma_like_tokenizer("unigram"),
              "bpe-byte-fallback": lambda: gemma_like_tokenizer("bpe"), "byte-level-bpe": byte_level_tokenizer}


def prune_tokenizer(data: dict, corpus: list[str], **config):
    from tokenizers import Tokenizer

    from exporter.prune.vocab import VocabConfig, choose_tokens, count_tokens, rewrite_tokenizer

    original = Tokenizer.from_str(json.dumps(data))
    plan = choose_tokens(data, count_tokens(original, corpus), VocabConfig(**config), special_ids=[0, 1, 2])
    return original, Tokenizer.from_str(json.dumps(rewrite_tokenizer(data, plan))), plan


# --- vocabulary --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", TOKENIZERS)
def test_pruned_tokenizer_round_trips_and_keeps_segmentation(kind):
    data = TOKENIZERS[kind]()
    original, pruned, plan = prune_tokenizer(data, KOREAN_LINES[:4], coverage=0.9, fill="none")
    assert len(plan.kept) < original.get_vocab_size()
    assert pruned.get_vocab_size() == len(plan.kept)
    kept = set(plan.kept)
    fully_kept = 0
    for text in KOREAN_LINES + HELD_OUT + random_texts(300):
        before = original.encode(text, add_special_tokens=False).ids
        after = pruned.encode(text, add_special_tokens=False).ids
        assert max(after, default=0) < len(plan.kept)
        assert pruned.decode(after) == original.decode(before) == text, (kind, text)
        if all(i in kept for i in before):
            fully_kept += 1
            assert [plan.kept[i] for i in after] == before, (kind, text)
    assert fully_kept >= 3  # the counted lines themselves


def test_bpe_keeps_merge_parents_so_kept_tokens_stay_reachable():
    data = gemma_like_tokenizer("bpe")
    _, pruned, plan = prune_tokenizer(data, KOREAN_LINES[:1], vocab_size=None, coverage=1.0, fill="none")
    vocab = data["model"]["vocab"]
    kept_pieces = {piece for piece, i in vocab.items() if i in set(plan.kept)}
    for left, right in data["model"]["merges"]:
        if left + right in kept_pieces:
            assert {left, right} <= kept_pieces
    assert all({a, b, a + b} <= kept_pieces for a, b in json.loads(pruned.to_str())["model"]["merges"])


def test_vocab_size_fills_from_the_tokenizer_prior():
    data = gemma_like_tokenizer("unigram")
    _, _, small = prune_tokenizer(data, KOREAN_LINES[:2], coverage=1.0)
    _, pruned, sized = prune_tokenizer(data, KOREAN_LINES[:2], vocab_size=len(small.kept) + 20)
    assert len(sized.kept) == len(small.kept) + 20 and set(small.kept) < set(sized.kept)
    assert sized.stats["from_prior_fill"] == 20
    assert pruned.get_vocab_size() == len(sized.kept)


def test_vocab_errors():
    from exporter.prune.vocab import VocabConfig, choose_tokens

    data = gemma_like_tokenizer("unigram")
    with pytest.raises(KoedgeError, match="fewer tokens than must stay"):
        choose_tokens(data, Counter({10: 5}), VocabConfig(vocab_size=100))
    with pytest.raises(KoedgeError, match="empty corpus"):
        choose_tokens(data, Counter(), VocabConfig(coverage=0.9))
    for bad in (0.0, 1.5):
        with pytest.raises(KoedgeError, match="coverage"):
            VocabConfig(coverage=bad).check()


def test_slice_embeddings_keeps_rows_and_remaps_specials(tiny_checkpoints):
    import torch
    from transformers import AutoModelForCausalLM

    from exporter.prune.vocab import VocabPlan, slice_embeddings

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["gemma3_text"])
    original = model.get_input_embeddings().weight.detach().clone()
    kept = [0, 1, 2, 7, 50, 100, 300]
    slice_embeddings(model, VocabPlan(kept, original.shape[0], {}))
    assert torch.equal(model.get_input_embeddings().weight, original[kept])
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.config.vocab_size == len(kept)
    assert (model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id) == (0, 1, 2)
    assert model(torch.tensor([[2, 3, 6]])).logits.shape[-1] == len(kept)


# --- structured ----------------------------------------------------------------------------------

def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _logits(model, ids=(2, 17, 40, 99, 5, 250, 33, 8, 61, 120, 7, 200, 41, 90, 3, 11, 64, 150, 9, 31)):
    import torch

    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen2", "exaone4", "gpt_neox"])
def test_ffn_pruning_equals_zeroing_the_channels(tiny_checkpoints, arch):
    import torch

    from exporter.prune.structured import decoder_layers, ffn_parts, prune_ffn

    pruned, masked = _load(tiny_checkpoints[arch]), _load(tiny_checkpoints[arch])
    keep = list(range(0, 128, 3))
    for layer in decoder_layers(pruned):
        prune_ffn(layer, keep)
    with torch.no_grad():
        for layer in decoder_layers(masked):
            down = ffn_parts(layer).output.weight
            drop = [c for c in range(down.shape[1]) if c not in keep]
            down[:, drop] = 0
    assert ffn_parts(decoder_layers(pruned)[0]).output.weight.shape[1] == len(keep)
    assert torch.allclose(_logits(pruned), _logits(masked), atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_head_pruning_equals_zeroing_heads_and_respects_groups(tiny_checkpoints, arch):
    import torch

    from exporter.prune.structured import attention_parts, decoder_layers, prune_heads

    pruned, masked = _load(tiny_checkpoints[arch]), _load(tiny_checkpoints[arch])
    parts = attention_parts(decoder_layers(pruned)[0])
    keep = [g * parts.group for g in range(parts.kv_heads)]  # first head of every KV group
    for layer in decoder_layers(pruned):
        prune_heads(layer, keep)
    with torch.no_grad():
        for layer in decoder_layers(masked):
            o = attention_parts(layer).o.weight
            for head in set(range(parts.heads)) - set(keep):
                o[:, head * parts.head_dim:(head + 1) * parts.head_dim] = 0
    assert torch.allclose(_logits(pruned), _logits(masked), atol=1e-4)
    if parts.kv_heads > 1:  # llama: 4 heads over 2 KV heads; removing both heads of one group is refused
        with pytest.raises(KoedgeError, match="unequal or empty KV groups"):
            prune_heads(decoder_layers(pruned)[0], [0])


@pytest.mark.parametrize("arch", ["gemma3_text", "llama"])
def test_dropping_a_layer_equals_skipping_it(tiny_checkpoints, arch):
    import torch

    from exporter.prune.sensitivity import _skip_layer
    from exporter.prune.structured import decoder_layers, drop_layers

    dropped, skipped = _load(tiny_checkpoints[arch]), _load(tiny_checkpoints[arch])
    drop_layers(dropped, [0])
    _skip_layer(decoder_layers(skipped)[0])
    assert dropped.config.num_hidden_layers == len(decoder_layers(dropped))
    if arch == "gemma3_text":
        assert dropped.config.layer_types == ["sliding_attention", "full_attention"]
    assert torch.allclose(_logits(dropped), _logits(skipped), atol=1e-4)
    with torch.no_grad():  # the KV cache path renumbers layers too
        out = dropped(torch.tensor([[2, 17, 40]]), use_cache=True)
        step = dropped(torch.tensor([[99]]), past_key_values=out.past_key_values, use_cache=True).logits
    assert torch.allclose(step[0, -1], _logits(dropped, (2, 17, 40, 99))[0, -1], atol=1e-4)


def test_global_and_local_scope_and_iterative_rounds(tiny_checkpoints):
    import torch

    from exporter.prune.structured import StructuredConfig, apply_structured, layer_shapes

    model = _load(tiny_checkpoints["llama"])
    local = apply_structured(model, StructuredConfig(ffn_ratio=0.5, head_ratio=0.5), [])
    assert [s["intermediate_size"] for s in local["layer_shapes"]] == [64, 64]
    assert [s["heads"] for s in local["layer_shapes"]] == [2, 2]
    assert local["parameters_after"] < local["parameters_before"]
    model = _load(tiny_checkpoints["llama"])
    with torch.no_grad():  # make layer 1's FFN weak so global pruning takes more from it
        for name, param in model.model.layers[1].mlp.named_parameters():
            param.mul_(0.01)
    apply_structured(model, StructuredConfig(ffn_ratio=0.5, scope="global", multiple_of=1), [])
    widths = [s["intermediate_size"] for s in layer_shapes(model)]
    assert widths == [128, 1]  # the weak layer gives all its channels, down to the floor of one
    model = _load(tiny_checkpoints["llama"])
    apply_structured(model, StructuredConfig(head_ratio=0.5, scope="global"), [])
    assert sum(s["heads"] for s in layer_shapes(model)) == 4  # half of 2 layers x 4 heads, one per group
    model = _load(tiny_checkpoints["llama"])
    apply_structured(model, StructuredConfig(ffn_ratio=0.5, steps=3, multiple_of=1), [])
    assert [s["intermediate_size"] for s in layer_shapes(model)] == [64, 64]


def test_activation_scores_use_calibration_text(tiny_checkpoints):
    import torch

    from exporter.prune.structured import ffn_scores, head_scores

    model = _load(tiny_checkpoints["qwen2"])
    batch = {"input_ids": torch.tensor([[2, 40, 41, 42, 43]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    other = {"input_ids": torch.tensor([[2, 200, 201, 202, 203]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    first, second = ffn_scores(model, "activation", [batch]), ffn_scores(model, "activation", [other])
    assert first[0].shape == (128,) and not torch.allclose(first[0], second[0])
    assert head_scores(model, "activation", [batch])[1].shape == (4,)


def test_structured_errors(tiny_checkpoints):
    from exporter.prune.structured import StructuredConfig, apply_structured

    model = _load(tiny_checkpoints["gpt_neox"])
    for config, message in ((StructuredConfig(ffn_ratio=1.0), "ffn-ratio"), (StructuredConfig(head_ratio=-0.1), "head-ratio"),
                            (StructuredConfig(drop_layers=[5]), "out of range"),
                            (StructuredConfig(drop_layers=[0, 1]), "every layer"),
                            (StructuredConfig(plan={"ffn": {"9": 0.5}}), "does not exist"),
                            (StructuredConfig(head_ratio=0.5), "fuses them")):
        with pytest.raises(KoedgeError, match=message):
            apply_structured(model, config, [])
    with pytest.raises(KoedgeError, match="one query head per KV head"):
        apply_structured(_mha_llama(tiny_checkpoints), StructuredConfig(head_ratio=0.5), [])


def _mha_llama(tiny_checkpoints):
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(tiny_checkpoints["llama"])
    config.num_key_value_heads = config.num_attention_heads
    return tf.AutoModelForCausalLM.from_config(config)


# --- sparsity ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("scope", ["local", "global"])
def test_magnitude_sparsity(tiny_checkpoints, scope):
    from exporter.prune.sparsity import SparsityConfig, magnitude_prune

    model = _load(tiny_checkpoints["llama"])
    embedding = model.get_input_embeddings().weight.detach().clone()
    result = magnitude_prune(model, SparsityConfig(0.5, scope))
    assert result["sparsity"] == pytest.approx(0.5, abs=0.01)
    if scope == "local":
        assert all(share == pytest.approx(0.5, abs=0.01) for share in result["by_kind"].values())
    assert model.get_input_embeddings().weight.equal(embedding)  # embeddings are left alone
    with pytest.raises(KoedgeError, match="sparsity"):
        SparsityConfig(1.0).check()


# --- end to end ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "lines.txt"
    path.write_text("\n".join(KOREAN_LINES[:6]) + "\n", encoding="utf-8")
    return path


def test_prune_command_exports_smaller_bundle(tiny_checkpoints, corpus_file, tmp_path, capsys):
    import onnx

    from exporter.cli import main
    from runtime.bundle import read_manifest, read_token_map, verify_files
    from runtime.model import CausalLM

    out = tmp_path / "bundle"
    code = main(["prune", "--model", str(tiny_checkpoints["gemma3_text"]), "--out", str(out), "--coverage", "1.0",
                 "--corpus", str(corpus_file), "--ffn-ratio", "0.5", "--head-ratio", "0.5", "--scope", "global",
                 "--score", "weight", "--eval-texts", "0"])
    assert code == 0, capsys.readouterr().err
    manifest = read_manifest(out)
    assert [record.name for record in manifest.passes] == ["prune", "export"]
    assert verify_files(out, manifest) == []
    prune = manifest.passes[0].results
    token_map = json.loads((out / prune["vocab"]["token_map"]).read_text())
    assert token_map["vocab_size"] == manifest.model.vocab_size == len(token_map["new_to_original"]) < 320
    assert token_map["original_vocab_size"] == 320
    assert read_token_map(out, manifest) == token_map["new_to_original"]
    assert prune["parameters_after"] == manifest.model.parameters < prune["parameters_before"]
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    dims = {tuple(t.dims) for t in graph.initializer}
    assert (manifest.model.vocab_size, 64) in dims
    widths = [shape["intermediate_size"] for shape in prune["structured"]["layer_shapes"]]
    assert all((64, w) in dims for w in widths) and max(widths) < 128
    runner = CausalLM(out)
    text = KOREAN_LINES[0]
    assert runner.decode(runner.encode(text)) == text
    logits = runner.step(np.array([runner.encode(text)]), runner.empty_past()).logits
    assert logits.shape[-1] == manifest.model.vocab_size


def test_pruning_a_pruned_checkpoint_composes_the_token_map(tiny_checkpoints, corpus_file, tmp_path):
    from safetensors.torch import load_file

    from exporter.prune.pipeline import PruneOptions, prune_checkpoint
    from exporter.prune.vocab import VocabConfig
    from exporter.export.sources import resolve_model

    first = PruneOptions(vocab=VocabConfig(coverage=1.0, corpora=[str(corpus_file)]), eval_texts=0)
    prune_checkpoint(resolve_model(str(tiny_checkpoints["llama"])), tmp_path / "a", first)
    second = PruneOptions(vocab=VocabConfig(vocab_size=262, corpora=[str(corpus_file)], fill="none"),
                          eval_texts=0)
    second.structured.ffn_ratio = 0.25
    prune_checkpoint(resolve_model(str(tmp_path / "a")), tmp_path / "b", second)
    history = json.loads((tmp_path / "b" / "koedge-passes.json").read_text())
    assert [record["name"] for record in history] == ["prune", "prune"]
    token_map = json.loads((tmp_path / "b" / "token_map.json").read_text())
    assert token_map["original_vocab_size"] == 320 and token_map["vocab_size"] == 262
    original = load_file(str(tiny_checkpoints["llama"] / "model.safetensors"))["model.embed_tokens.weight"]
    pruned = load_file(str(tmp_path / "b" / "model.safetensors"))["model.embed_tokens.weight"]
    assert pruned.equal(original[token_map["new_to_original"]])


def test_nonuniform_checkpoint_reloads(tiny_checkpoints, tmp_path):
    import torch

    from exporter.export.convert import load_torch_model
    from exporter.prune.structured import StructuredConfig, apply_structured, record_shapes
    from exporter.export.sources import resolve_model

    model = _load(tiny_checkpoints["exaone4"])
    apply_structured(model, StructuredConfig(plan={"ffn": {"0": 0.75}, "heads": {"2": 0.5}, "drop_layers": [3]}), [])
    assert record_shapes(model)
    model.save_pretrained(tmp_path)
    again = load_torch_model(resolve_model(str(tmp_path)))
    assert torch.equal(_logits(model), _logits(again))
    model = _load(tiny_checkpoints["llama"])
    apply_structured(model, StructuredConfig(ffn_ratio=0.5), [])
    assert not record_shapes(model) and model.config.intermediate_size == 64
    model.save_pretrained(tmp_path / "uniform")
    assert torch.equal(_logits(model), _logits(_load(tmp_path / "uniform")))  # plain transformers loads it


def test_prune_refuses_bundles_and_bad_options(tiny_bundles, tiny_checkpoints, tmp_path, capsys):
    import shutil

    from exporter.cli import main
    from runtime.bundle import PassRecord, read_manifest, write_manifest

    quantized = tmp_path / "quantized"
    shutil.copytree(tiny_bundles["llama"], quantized)
    manifest = read_manifest(quantized)
    manifest.passes.append(PassRecord("quantize-int4", {}, 1.0))
    write_manifest(quantized, manifest)
    cases = [(["--model", str(quantized), "--vocab-size", "100"], "prune before quantizing"),
             (["--model", str(tiny_bundles["llama"]), "--vocab-size", "100"], "exported bundle"),
             (["--model", str(tiny_checkpoints["llama"])], "nothing to prune"),
             (["--model", str(tiny_checkpoints["llama"]), "--ffn-ratio", "1.5"], "must be in"),
             (["--model", str(tiny_checkpoints["llama"]), "--coverage", "0"], "coverage"),
             (["--model", str(tiny_checkpoints["llama"]), "--sparsity", "-0.1"], "sparsity")]
    for args, message in cases:
        assert main(["prune", *args, "--out", str(tmp_path / "x")]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()
    from exporter.prune.pipeline import options_from_dict

    with pytest.raises(KoedgeError, match="unknown option"):
        options_from_dict({"vocab_sizes": 1000})
    options = options_from_dict({"coverage": 0.99, "corpus": "klue", "drop_layers": "0,1", "sparsity": 0.3})
    assert options.vocab.corpora == ["klue"] and options.structured.drop_layers == [0, 1] and options.active


@requires_data
def test_sensitivity_report(tiny_checkpoints, tmp_path):
    from exporter.prune.pipeline import PruneOptions, run_sensitivity
    from exporter.export.sources import resolve_model

    result = run_sensitivity(resolve_model(str(tiny_checkpoints["llama"])), PruneOptions(eval_texts=6),
                             tmp_path, [0.5], threshold=1.0, progress=lambda message: None)
    rows = result["rows"]
    assert len(rows) == 2 * 3  # per layer: FFN 0.5, heads 0.5 (1 of 2 per group), whole layer
    assert {r["kind"] for r in rows} == {"ffn", "heads", "layer"}
    assert all(r["kl"] > 0 and r["params_removed"] > 0 for r in rows)
    assert (tmp_path / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "sensitivity.md").read_text()
    assert "| 0 |" in table and "| 1 |" in table
    plan = json.loads((tmp_path / "plan-suggested.json").read_text())
    assert set(plan) >= {"ffn", "heads", "drop_layers"}


@requires_data
def test_scorer_bits_per_byte(tiny_checkpoints):
    import torch

    from exporter.prune.sensitivity import EvalSet, Scorer

    model = _load(tiny_checkpoints["llama"])
    texts = KOREAN_LINES[:4]
    evalset = EvalSet.from_texts(tiny_checkpoints["llama"] / "tokenizer.json", texts, bos=2)
    scorer = Scorer(evalset, model.config.vocab_size, record_layers=True)
    first = scorer.score(model)
    nll = 0.0
    with torch.no_grad():
        for ids in evalset.ids:
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
            nll -= float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
    assert first["bits_per_byte"] == pytest.approx(nll / np.log(2) / sum(len(t.encode()) for t in texts), rel=1e-4)
    assert first["kl"] == 0 and scorer.score(model)["kl"] == pytest.approx(0, abs=1e-4)
    replayed = scorer.score(model, start_layer=1)  # from the recorded inputs of layer 1
    assert replayed["bits_per_byte"] == pytest.approx(first["bits_per_byte"], rel=1e-6)


# --- the real model ---------------------------------------------------------------------------------------

@pytest.mark.slow
@requires_data
def test_gemma_vocabulary_pruning(gemma_checkpoint, tmp_path):
    """Issue 6's target on gemma-3-270m: 262,144 -> 32,768 tokens, bits/byte within +1% on eval text."""
    from tokenizers import Tokenizer

    from exporter.prune.pipeline import PruneOptions, prune_checkpoint
    from exporter.prune.vocab import VocabConfig

    options = PruneOptions(vocab=VocabConfig(vocab_size=32768), eval_texts=64)
    results = prune_checkpoint(gemma_checkpoint, tmp_path / "ckpt", options, progress=lambda message: None)
    vocab = results["vocab"]
    assert vocab["vocab_size"] == 32768 and vocab["corpus_coverage"] == 1.0
    check = vocab["tokenizer_check"]
    assert check["round_trip_exact"] == check["texts"] > 10000
    assert check["same_segmentation_when_fully_kept"] == check["texts_fully_kept"]
    assert results["delta_bpb_pct"] <= 1.0, results
    assert results["parameters_after"] < 0.46 * results["parameters_before"]  # 121.3M of 268.1M
    pruned = Tokenizer.from_file(str(tmp_path / "ckpt" / "tokenizer.json"))
    for text in random_texts(500, seed=1):
        assert pruned.decode(pruned.encode(text, add_special_tokens=False).ids) == text


@pytest.mark.parametrize("arch", ["gemma3_text", "gpt_neox"])
def test_variant_costs_equal_scoring_the_pruned_model(tiny_checkpoints, corpus_file, tmp_path, arch):
    """Scoring a vocabulary from the unpruned model's pass gives the pruned model's own bits per byte,
    for texts it segments like the original and for texts it segments differently."""
    from exporter.export.convert import load_torch_model
    from exporter.export.sources import resolve_model
    from exporter.prune.pipeline import PruneOptions, prune_checkpoint
    from exporter.prune.sensitivity import EvalSet, Scorer
    from exporter.prune.vocab import VocabConfig
    from exporter.prune.vocab_eval import Variant, variant_costs

    source = resolve_model(str(tiny_checkpoints[arch]))
    options = PruneOptions(vocab=VocabConfig(coverage=1.0, corpora=[str(corpus_file)], fill="none"), eval_texts=0)
    prune_checkpoint(source, tmp_path / "pruned", options)
    kept = json.loads((tmp_path / "pruned" / "token_map.json").read_text())["new_to_original"]
    texts = KOREAN_LINES + HELD_OUT
    model = load_torch_model(source)
    costs = variant_costs(model, source.path / "tokenizer.json", texts,
                          {"pruned": Variant(kept, tmp_path / "pruned" / "tokenizer.json")}, bos=2)
    assert 0 < costs["pruned"]["texts_resegmented"] < len(texts)
    pruned = load_torch_model(resolve_model(str(tmp_path / "pruned")))
    for folder, which, net in ((source.path, "original", model), (tmp_path / "pruned", "pruned", pruned)):
        evalset = EvalSet.from_texts(folder / "tokenizer.json", texts, net.config.bos_token_id)
        expected = Scorer(evalset, net.config.vocab_size, keep_reference=False).score(net)["bits_per_byte"]
        assert abs(costs[which]["bits_per_byte"] - expected) < 1e-4 * expected, which


def test_ko_formal_fill_keeps_hangul_hanja_and_symbols_before_english():
    from exporter.prune.vocab import _is_hangul_piece, _model_pieces

    data = gemma_like_tokenizer("unigram")
    data["model"]["vocab"] += [["\u2581zebra", -1.0], ["漢", -30.0], ["字", -31.0], ["學", -32.0], ["℃", -40.0], ["\u2581zz", -99.0]]  # zz: the required min-score piece
    _, _, small = prune_tokenizer(data, KOREAN_LINES[:2], coverage=1.0)
    pieces = _model_pieces(data)
    hangul_left = sum(_is_hangul_piece(p) and i not in small.kept for i, p in enumerate(pieces))
    size = len(small.kept) + hangul_left + 3
    _, pruned, formal = prune_tokenizer(data, KOREAN_LINES[:2], vocab_size=size, hanja=2)
    added = {pieces[i] for i in set(formal.kept) - set(small.kept)}
    assert {"漢", "字", "℃"} <= added and not {"學", "\u2581zebra"} & added
    assert all(_is_hangul_piece(p) for p in added - {"漢", "字", "℃"})
    _, _, ko_en = prune_tokenizer(data, KOREAN_LINES[:2], vocab_size=size, fill="ko-en")
    assert "\u2581zebra" in {pieces[i] for i in ko_en.kept} and "漢" not in {pieces[i] for i in ko_en.kept}
    assert pruned.encode("漢字", add_special_tokens=False).tokens == ["漢", "字"]


def test_balanced_counts_weigh_a_small_corpus_like_a_large_one():
    from exporter.prune.vocab import merge_counts

    large, small = Counter({1: 900, 2: 100}), Counter({3: 10})
    assert merge_counts([large, small], balance=False) == Counter({1: 900, 2: 100, 3: 10})
    balanced = merge_counts([large, small], balance=True)
    assert balanced[3] == 1000 and balanced[1] == 900  # the small corpus's tokens now outrank token 2


@pytest.mark.slow
@requires_data
def test_gemma_vocabulary_holds_on_formal_and_informal_held_out_text(gemma_checkpoint, tmp_path):
    """Issue 17: the default 32k vocabulary (counted on NSMC and KLUE calib, ko-formal fill) costs at most
    +1% bits per byte on formal (KLUE eval split) and informal (NSMC eval split) text it never counted."""
    from exporter.export.convert import load_torch_model
    from exporter.prune.pipeline import _special_ids
    from exporter.prune.vocab import VocabConfig, plan_vocabulary, write_pruned_tokenizer
    from exporter.prune.vocab_eval import Variant, variant_costs
    from runtime.data import load_texts

    model = load_torch_model(gemma_checkpoint)
    plan = plan_vocabulary(gemma_checkpoint.path, VocabConfig(vocab_size=32768), _special_ids(model),
                           progress=lambda message: None)
    assert plan.stats["corpora"].keys() == {"nsmc", "klue"}
    write_pruned_tokenizer(gemma_checkpoint.path, tmp_path, plan)
    variant = {"32k": Variant(plan.kept, tmp_path / "tokenizer.json")}
    for source in ("klue", "nsmc"):
        texts = load_texts(source, split="eval")[:100]
        costs = variant_costs(model, gemma_checkpoint.path / "tokenizer.json", texts, variant, model.config.bos_token_id)
        assert costs["32k"]["delta_bpb_pct"] <= 1.0, (source, costs)
