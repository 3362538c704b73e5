"""`koedge plan` arithmetic and recipe validation."""

from __future__ import annotations

import json

import pytest

from exporter.build.plan import GIB, WEIGHT_BYTES, parse_size, plan, shape_from_config
from exporter.recipes import parse_recipe
from runtime.errors import KoedgeError

LLAMA_3B = dict(model_type="llama", hidden_size=3072, num_hidden_layers=28, num_attention_heads=24,
                num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True)


def test_parameter_count_matches_the_real_models():
    from exporter.export.sources import POLYGLOT_KO_1_3B_CONFIG

    shape = shape_from_config("pko", {**POLYGLOT_KO_1_3B_CONFIG, "model_type": "gpt_neox"})
    assert shape.parameters == 1_331_810_304  # polyglot-ko-1.3b's published count


@pytest.mark.parametrize("name, parameters", [("gemma-3-270m", 268_098_176), ("smollm2-135m", 134_515_008)])
def test_parameter_count_of_packaged_models(name, parameters):
    from exporter.export.sources import cache_root

    config = cache_root() / "models" / name / "config.json"
    if not config.is_file():
        pytest.skip(f"{name} not converted yet")
    assert shape_from_config(name, json.loads(config.read_text())).parameters == parameters


def test_a_3b_model_fits_only_at_int4_and_not_in_3gb_once_prepacked():
    shape = shape_from_config("llama3b", LLAMA_3B)
    assert 3.1e9 < shape.parameters < 3.3e9
    rows = plan(shape, 2048)
    int4 = next(row for row in rows if row.precision == "int4")
    # the pre-packed copy counts: the tied embedding's in full, a share of the rest
    assert int4.weights > (shape.parameters + shape.embedding_parameters) * WEIGHT_BYTES["int4"]
    assert {row.precision: row.total <= 3 * GIB for row in rows} == {
        "fp32": False, "fp16": False, "int8": False, "int4": False}
    assert {row.precision: row.total <= 4.5 * GIB for row in rows} == {
        "fp32": False, "fp16": False, "int8": False, "int4": True}


def test_kv_cache_arithmetic():
    shape = shape_from_config("llama3b", LLAMA_3B)
    row = next(row for row in plan(shape, 1000) if row.precision == "fp16")
    assert row.kv_cache == 2 * 28 * 8 * 128 * 1000 * 2


@pytest.mark.parametrize("text, expected", [("3GiB", 3 * GIB), ("3GB", 3 * 10**9), ("2500MB", 2.5e9), ("1.5GiB", 1.5 * GIB), ("1.5G", 1.5e9)])
def test_parse_size(text, expected):
    assert parse_size(text) == int(expected)


@pytest.mark.parametrize("text", ["lots", "3XB", "-1GiB", ""])
def test_parse_size_rejects(text):
    with pytest.raises(KoedgeError):
        parse_size(text)


def _recipe(*passes: str) -> str:
    return "\n".join(f'[[passes]]\npass = "{name}"\n' for name in passes)


def test_recipe_order_is_checked():
    parse_recipe(_recipe("prune-vocab", "export", "quantize-int4", "validate", "eval"), "ok")
    with pytest.raises(KoedgeError, match="'prune-vocab' cannot come after 'quantize-int4'"):
        parse_recipe(_recipe("export", "quantize-int4", "prune-vocab"), "bad")
    with pytest.raises(KoedgeError, match="unknown pass 'distill'"):
        parse_recipe(_recipe("export", "distill"), "bad")
    with pytest.raises(KoedgeError, match="exactly one 'export'"):
        parse_recipe(_recipe("quantize-int4"), "bad")
    with pytest.raises(KoedgeError, match="not valid TOML"):
        parse_recipe("[[passes]\n", "bad")


def test_plan_cli_json(capsys):
    from exporter.cli import main

    assert main(["plan", "--model", "polyglot-ko-1.3b-shape", "--context", "768", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {row["precision"]: row["fits"] for row in report["rows"]} == {
        "fp32": False, "fp16": True, "int8": True, "int4": True}
