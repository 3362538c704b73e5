"""The phone engine's Kotlin tokenizer equals Hugging Face `tokenizers` on every NSMC review and KLUE sentence.

For each tokenizer koedge ships (the tiny models' byte-level BPE, the same vocabulary-pruned, gemma-3-270m's
Unigram with byte fallback, and gemma pruned to 32k tokens), the reference ids (`encode(text,
add_special_tokens=False)`) and decode of those ids (`skip_special_tokens=True`) are written to a JSONL file
and the engine jar's `--check-tokenizer` mode compares every line; it prints the counts and exits 1 on any
difference. The counts are printed with `pytest -s`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import requires_data
from test_android_engine import engine_jar, run_jar  # noqa: F401  (the jar fixture)

# Texts of every kind a phone prompt may hold, beyond the corpora: specials, spacing, digits, emoji, broken
# syllables, jamo, Latin, nothing at all.
EXTRA_TEXTS = [
    "", " ", "  두 칸  띄움  ", "\t탭\n줄바꿈\r\n", "<s>특수</s> 토큰<pad>", "<bos>안녕<eos>", "12345 ６７８ ①②",
    "똠방각하 뷁 햏햏 쀍 궯", "ㅋㅋㅋㅋ ㅠㅠ ㄱㄴㄷ", "😀👍🏽 끝.", "The quick brown fox, it's 3.14!", "漢字 かな",
    "a\u00a0b\u3000c\u200bd", "e\u0301 \ufb01", "'s 're 've 'll 'd",
]


def corpus_texts() -> list[str]:
    from runtime.data import klue_sentences, nsmc_rows

    return [row.text for row in nsmc_rows("all")] + klue_sentences("all") + EXTRA_TEXTS


def write_reference(tokenizer_file: Path, texts: list[str], out: Path) -> int:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokens = 0
    with open(out, "w", encoding="utf-8") as handle:
        for start in range(0, len(texts), 4096):
            chunk = texts[start:start + 4096]
            encodings = tokenizer.encode_batch(chunk, add_special_tokens=False)
            decoded = tokenizer.decode_batch([e.ids for e in encodings], skip_special_tokens=True)
            for text, encoding, back in zip(chunk, encodings, decoded):
                tokens += len(encoding.ids)
                handle.write(json.dumps({"text": text, "ids": encoding.ids, "decoded": back}, ensure_ascii=False))
                handle.write("\n")
    return tokens


def assert_parity(jar: Path, tokenizer_file: Path, tmp_path: Path, name: str, every: int = 1) -> None:
    """`every`: take one text in that many (1 = all of them)."""
    texts = corpus_texts()[::every]
    reference = tmp_path / f"{name}.jsonl"
    tokens = write_reference(tokenizer_file, texts, reference)
    result = run_jar(jar, "--check-tokenizer", str(tokenizer_file), str(reference), timeout=900)
    out = result.stdout.decode("utf-8")
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    print(f"\n{name}: {summary}")
    assert result.returncode == 0, out[-4000:] + result.stderr.decode()[-2000:]
    match = re.search(r"(\d+) texts, (\d+) tokens: encode identical (\d+), decode identical (\d+)", summary)
    assert match, summary
    count, token_count, same_encode, same_decode = map(int, match.groups())
    assert count == len(texts)
    assert token_count == tokens and same_encode == same_decode == len(texts)
    assert every > 1 or len(texts) > 100_000  # every NSMC review and KLUE sentence


def pruned_tokenizer(source: Path, target: Path, vocab_size: int, special_ids: list[int]) -> Path:
    """koedge's vocabulary pruning (exporter/prune_vocab.py) applied to a tokenizer folder."""
    from exporter.prune.vocab import VocabConfig, plan_vocabulary, write_pruned_tokenizer

    target.mkdir(parents=True, exist_ok=True)
    plan = plan_vocabulary(source, VocabConfig(vocab_size=vocab_size, max_texts=20_000), special_ids,
                           progress=lambda message: None)
    write_pruned_tokenizer(source, target, plan)
    return target / "tokenizer.json"


@requires_data
def test_tiny_byte_level_bpe_parity(tiny_bundles, engine_jar, tmp_path):
    assert_parity(engine_jar, tiny_bundles["llama"] / "tokenizer.json", tmp_path, "tiny byte-level BPE")


@requires_data
def test_tiny_pruned_bpe_parity(tiny_checkpoints, engine_jar, tmp_path):
    tokenizer = pruned_tokenizer(tiny_checkpoints["llama"], tmp_path / "pruned", 290, [0, 1, 2])
    assert len(json.loads(tokenizer.read_text(encoding="utf-8"))["model"]["vocab"]) < 320
    assert_parity(engine_jar, tokenizer, tmp_path, "tiny byte-level BPE pruned to 290", every=8)  # CI time


@pytest.mark.slow
@requires_data
def test_gemma_unigram_parity(gemma_bundle, engine_jar, tmp_path):
    assert_parity(engine_jar, gemma_bundle / "tokenizer.json", tmp_path, "gemma-3-270m Unigram")


@pytest.mark.slow
@requires_data
def test_gemma_pruned_unigram_parity(gemma_checkpoint, engine_jar, tmp_path):
    tokenizer = pruned_tokenizer(Path(gemma_checkpoint.path), tmp_path / "pruned", 32768, [0, 1, 2, 3])
    assert_parity(engine_jar, tokenizer, tmp_path, "gemma-3-270m Unigram pruned to 32k")
