"""Calibration data: packed Korean sequences, prefill + decode feeds with FP32 past KV, clear errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from exporter.quantize.calibration import CalibrationConfig, KVCacheReader, build_sequences
from runtime.errors import KoedgeError
from runtime.model import CausalLM
from conftest import requires_data
from tiny_models import KOREAN_LINES


@pytest.fixture(scope="module")
def tiny(tiny_bundles):
    return CausalLM(tiny_bundles["gemma3_text"])


@pytest.fixture()
def lines_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(KOREAN_LINES * 3), encoding="utf-8")
    return path


def test_sequences_are_packed_disjoint_and_seeded(tiny, lines_file):
    config = CalibrationConfig(source=str(lines_file), samples=6, holdout=2, min_length=8, max_length=24,
                               decode_steps=3, seed=1)
    calibration, holdout = build_sequences(tiny, config)
    assert len(calibration) == 6 and len(holdout) == 2
    bos = tiny.manifest.tokens.bos_token_id
    for sequence in calibration + holdout:
        assert sequence.ids[0] == bos and 8 <= len(sequence.ids) <= 24
        assert len(sequence.ids) - sequence.prefill == 3
    assert len({len(s.ids) for s in calibration}) > 1  # varied prefill lengths
    again, _ = build_sequences(tiny, config)
    assert [s.ids for s in again] == [s.ids for s in calibration]
    other, _ = build_sequences(tiny, CalibrationConfig(**{**config.__dict__, "seed": 2}))
    assert [s.ids for s in other] != [s.ids for s in calibration]


def test_reader_yields_prefill_then_decode_with_fp32_past(tiny, lines_file):
    config = CalibrationConfig(source=str(lines_file), samples=2, holdout=0, min_length=10, max_length=12,
                               decode_steps=2)
    sequences, _ = build_sequences(tiny, config)
    reader = KVCacheReader(tiny, sequences)
    feeds = list(iter(reader.get_next, None))
    assert len(feeds) == len(reader) == 2 * 3
    info = tiny.manifest.model
    key = tiny.manifest.io.past_key.format(layer=0)
    names = set(tiny.manifest.io.input_names())  # logits_to_keep included: 0, every position's logits
    first = sequences[0]
    prefill, step1, step2 = feeds[:3]
    assert set(prefill) == names and set(step1) == names
    assert prefill["input_ids"].shape == (1, first.prefill)
    assert prefill[tiny.manifest.io.logits_to_keep].tolist() == [0]
    assert prefill[key].shape == (1, info.num_kv_heads, 0, info.head_dim)
    assert step1["input_ids"].shape == (1, 1) and step1["input_ids"][0, 0] == first.ids[first.prefill]
    assert step1[key].shape == (1, info.num_kv_heads, first.prefill, info.head_dim)
    assert step1["attention_mask"].shape == (1, first.prefill + 1)
    assert step2[key].shape == (1, info.num_kv_heads, first.prefill + 1, info.head_dim)
    # the decode past is what the FP32 model computes on the same tokens
    expected = tiny.step(np.array([first.ids[: first.prefill + 1]]), tiny.empty_past()).present[key]
    np.testing.assert_allclose(step2[key], expected, atol=1e-5)
    reader.rewind()
    assert reader.get_next()["input_ids"].shape == prefill["input_ids"].shape


@requires_data
def test_named_korean_set(tiny):
    calibration, holdout = build_sequences(tiny, CalibrationConfig(source="nsmc", samples=4, holdout=1))
    assert len(calibration) == 4 and len(holdout) == 1


@pytest.mark.parametrize("content, message", [
    (b"", "holds no text"),
    (b"\xff\xfe\x00bad", "not UTF-8"),
    ("\n".join(KOREAN_LINES[:3]).encode(), "fewer than the"),
])
def test_source_errors(tiny, tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(KoedgeError, match=message):
        build_sequences(tiny, CalibrationConfig(source=str(path), samples=4, holdout=1))


def test_text_that_tokenizes_to_nothing(tiny_bundles, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundles["gemma3_text"], bundle)
    tokenizer = json.loads((bundle / "tokenizer.json").read_text())
    tokenizer["normalizer"] = {"type": "Replace", "pattern": {"Regex": "#"}, "content": ""}
    (bundle / "tokenizer.json").write_text(json.dumps(tokenizer))
    path = tmp_path / "calib.jsonl"
    rows = [{"text": line} for line in KOREAN_LINES] + [{"text": "###"}]
    path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows), encoding="utf-8")
    with pytest.raises(KoedgeError, match="tokenizes to nothing"):
        build_sequences(CausalLM(bundle), CalibrationConfig(source=str(path), samples=len(rows), holdout=0))


@pytest.mark.parametrize("change", [{"samples": 0}, {"min_length": 1}, {"min_length": 30, "max_length": 20},
                                    {"decode_steps": 16, "min_length": 16}])
def test_bad_config(change):
    with pytest.raises(KoedgeError):
        CalibrationConfig(**change).check()
