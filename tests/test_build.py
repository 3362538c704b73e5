"""`koedge build`: recipes run in order, every pass is cached, the last changed pass alone re-runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_data
from exporter.recipes import load_recipe, parse_recipe, shipped_recipes
from runtime.bundle import read_manifest, verify_files
from runtime.errors import KoedgeError

RECIPE = """
name = "tiny"
description = "tiny test recipe"
[[passes]]
pass = "export"
[[passes]]
pass = "quantize-int4"
block_size = 32
[[passes]]
pass = "validate"
mem_cap = "1GiB"
prompt_tokens = 32
new_tokens = 8
[[passes]]
pass = "eval"
max_samples = {samples}
tokens_per_sample = 64
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KOEDGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@requires_data
def test_build_caches_each_pass(tiny_checkpoints, cache, tmp_path):
    from exporter.build.engine import format_summary, run_recipe

    out = tmp_path / "out"
    quiet = lambda message: None  # noqa: E731
    first = run_recipe(str(tiny_checkpoints["gemma3_text"]), parse_recipe(RECIPE.format(samples=2), "tiny"), out,
                       progress=quiet)
    assert [o.cached for o in first] == [False] * 4
    manifest = read_manifest(out)
    assert [record.name for record in manifest.passes] == ["export", "quantize-int4"]
    report = json.loads((out / "report.json").read_text())
    assert [item["pass"] for item in report["passes"]] == ["export", "quantize-int4", "validate", "eval"]
    assert report["passes"][2]["results"]["passed"] is True
    assert report["passes"][3]["results"]["bundle"]["kl_mean"] >= 0
    assert verify_files(out, manifest) == []  # the file table describes the published report too
    assert "report.json" in manifest.files
    summary = format_summary(parse_recipe(RECIPE.format(samples=2), "tiny"), first)
    assert "PASS" in summary
    # Copies, not hard links: onnx refuses external data in a multiply-linked file, which would
    # break the next pass that loads the cached bundle.
    assert all(path.stat().st_nlink == 1 for path in out.iterdir())
    assert all(path.stat().st_nlink == 1 for path in (first[0].folder).iterdir())

    again = run_recipe(str(tiny_checkpoints["gemma3_text"]), parse_recipe(RECIPE.format(samples=2), "tiny"), out,
                       progress=quiet)
    assert [o.cached for o in again] == [True] * 4
    changed = run_recipe(str(tiny_checkpoints["gemma3_text"]), parse_recipe(RECIPE.format(samples=3), "tiny"), out,
                         progress=quiet)
    assert [o.cached for o in changed] == [True, True, True, False]
    forced = run_recipe(str(tiny_checkpoints["gemma3_text"]), parse_recipe(RECIPE.format(samples=3), "tiny"), out,
                        force=True, progress=quiet)
    assert not any(o.cached for o in forced)


def test_unknown_option_is_refused_before_work(tiny_checkpoints, cache, tmp_path):
    from exporter.build.engine import run_recipe

    recipe = parse_recipe('[[passes]]\npass = "export"\ndtipe = "fp16"\n', "typo")
    with pytest.raises(KoedgeError, match="unknown option\\(s\\) dtipe"):
        run_recipe(str(tiny_checkpoints["llama"]), recipe, tmp_path / "out", progress=lambda message: None)
    assert not (tmp_path / "out").exists()


def test_unwritable_cache_is_one_line(tiny_checkpoints, tmp_path):
    if os.geteuid() == 0:
        blocked = tmp_path / "file-not-folder"
        blocked.write_text("")
        cache_dir = blocked / "cache"  # a path under a file cannot be created, even by root
    else:
        cache_dir = Path("/proc/koedge-cache")
    result = subprocess.run([sys.executable, "-m", "exporter.cli", "build", "--model", str(tiny_checkpoints["llama"]),
                             "--recipe", "fp32", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, env={**os.environ, "KOEDGE_CACHE": str(cache_dir)})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("koedge: error: cache folder")


def test_shipped_recipes_are_valid():
    names = shipped_recipes()
    assert {"phone-3gb", "phone-small", "int8-static", "fp32"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.passes[0].name in ("export", "prune-vocab", "prune-structured")
        assert any(spec.name == "validate" for spec in recipe.passes)


def test_unknown_recipe_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "exporter.cli", "build", "--model", "gemma-3-270m",
                             "--recipe", "phone-9gb", "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 1
    assert "unknown recipe 'phone-9gb'" in result.stderr.strip().splitlines()[-1]
