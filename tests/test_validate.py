"""`koedge validate`: sizes, the predicted budget, and a cap that is enforced (a run over it FAILS)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from runtime.bundle import read_manifest
from runtime.errors import KoedgeError
from runtime.memory import (ATTENTION_CHUNK, MIB, kv_buffer_positions, kv_cache_bytes, parse_size, predict_budget,
                            prefill_chunk_for, untouched_rotary_bytes)
from runtime.validate import ValidateConfig, _own_cgroup_dirs, _make_cgroup, validate


@pytest.mark.parametrize("text, expected", [("3GiB", 3 * 2**30), ("3GB", 3 * 10**9), ("2500MB", 2500 * 10**6),
                                            ("1.5 GiB", int(1.5 * 2**30)), ("512mib", 512 * 2**20), ("100", 100)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "3 XB", "GiB", "-1GB", "three"])
def test_parse_size_rejects(text):
    with pytest.raises(KoedgeError, match="cannot read the size"):
        parse_size(text)


def test_budget_counts_kv_per_manifest(tiny_bundles):
    manifest = read_manifest(tiny_bundles["llama"])
    info = manifest.model
    assert kv_cache_bytes(manifest, 100) == 2 * info.num_layers * info.num_kv_heads * info.head_dim * 100 * 4
    budget = predict_budget(manifest, 64, 32, prefill_chunk=0)
    # the rotary table rows past the run's positions are never read (fused graphs: test_fused_rotary.py)
    unread = untouched_rotary_bytes(manifest, kv_buffer_positions(manifest, 64, 32))
    assert 0 < unread < manifest.weight_bytes() and budget.weights == manifest.weight_bytes() - unread
    assert budget.total == budget.weights + budget.kv_cache + budget.activations + budget.prepacked + budget.runtime
    assert budget.prepacked == 0 and budget.runtime > 0  # FP32: weights memory-mapped, nothing pre-packed
    assert predict_budget(manifest, 64, 32, prefill_chunk=16).activations < budget.activations


def test_auto_prefill_chunk_bounds_the_logits(tiny_bundles):
    manifest = read_manifest(tiny_bundles["llama"])
    assert manifest.io.logits_to_keep  # last-position logits: pieces bound only the attention scores
    manifest.model.max_positions = 4096
    assert prefill_chunk_for(manifest, "auto") == ATTENTION_CHUNK
    manifest.model.vocab_size = 262144
    assert prefill_chunk_for(manifest, "auto") == ATTENTION_CHUNK
    manifest.io.logits_to_keep = None  # a graph returning every position's logits (e.g. a peer's)
    manifest.model.vocab_size = 32000
    assert prefill_chunk_for(manifest, "auto") == 524  # 64 MiB of float32 logits
    assert prefill_chunk_for(manifest, 0) is None and prefill_chunk_for(manifest, 32) == 32
    manifest.model.vocab_size = 262144  # gemma's: 64 rows of logits are 64 MiB
    assert prefill_chunk_for(manifest, "auto") == 64
    with pytest.raises(KoedgeError):
        prefill_chunk_for(manifest, "half")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporter.cli", "validate", *args], capture_output=True, text=True,
                          timeout=900)


def test_validate_passes_under_a_roomy_cap(tiny_bundles):
    done = _cli(str(tiny_bundles["qwen2"]), "--mem-cap", "3GiB", "--prompt-tokens", "64", "--new-tokens", "32",
                "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["passed"] and report["verdict"].startswith("PASS")
    assert 0 < report["peak_rss_bytes"] < 3 * 2**30
    assert report["load_seconds"] > 0 and report["ttft_seconds"] > 0 and report["decode_tokens_per_second"] > 0
    assert [stage["stage"] for stage in report["stages"]][-1] == "done"


def test_validate_fails_over_the_cap(tiny_bundles):
    """40 MB is above the tiny model's weights but below what Python + onnxruntime need: killed, exit 2."""
    done = _cli(str(tiny_bundles["qwen2"]), "--mem-cap", "40MB", "--prompt-tokens", "64", "--new-tokens", "32")
    assert done.returncode == 2
    assert "FAIL" in done.stdout and "cap" in done.stdout


def test_cap_below_weights_is_refused_before_running(tiny_bundles):
    with pytest.raises(KoedgeError, match="below the model's weights"):
        validate(tiny_bundles["qwen2"], ValidateConfig(mem_cap=1000, prompt_tokens=8, new_tokens=8))
    done = _cli(str(tiny_bundles["qwen2"]), "--mem-cap", "1000", "--prompt-tokens", "8", "--new-tokens", "8")
    assert done.returncode == 1 and "below the model's weights" in done.stderr


def test_not_a_bundle_and_too_many_tokens(tiny_bundles, tmp_path):
    with pytest.raises(KoedgeError, match="not a koedge bundle"):
        validate(tmp_path, ValidateConfig(mem_cap=3 * 2**30))
    with pytest.raises(KoedgeError, match="context"):
        validate(tiny_bundles["qwen2"], ValidateConfig(mem_cap=3 * 2**30, prompt_tokens=500, new_tokens=100))


def test_rlimit_mechanism_also_enforces(tiny_bundles):
    config = ValidateConfig(mem_cap=40 * 10**6, prompt_tokens=32, new_tokens=8, mechanism="rlimit")
    report = validate(tiny_bundles["qwen2"], config)
    assert not report.passed and "RLIMIT_AS" in report.mechanism
    config.mem_cap = 3 * 2**30
    assert validate(tiny_bundles["qwen2"], config).passed


def _cgroup_writable() -> bool:
    for kind, parent in _own_cgroup_dirs():
        if path := _make_cgroup(kind, parent, 2**30):
            path.rmdir()
            return True
    return False


@pytest.mark.skipif(not _cgroup_writable(), reason="no writable memory cgroup on this machine")
def test_kernel_limit_alone_stops_the_child(tiny_bundles):
    """Without the watchdog, the cgroup limit by itself kills a child that needs more."""
    config = ValidateConfig(mem_cap=12 * 10**6, prompt_tokens=32, new_tokens=8, mechanism="cgroup", watchdog=False)
    report = validate(tiny_bundles["qwen2"], config)
    assert not report.passed and "killed by the kernel" in report.verdict
    assert report.cgroup_peak_bytes <= config.mem_cap


# --- gemma-3-270m (slow) -----------------------------------------------------------------------

@pytest.mark.slow
def test_gemma_validates_at_3gib(gemma_bundle):
    done = _cli(str(gemma_bundle), "--mem-cap", "3GiB", "--prompt-tokens", "512", "--new-tokens", "256", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["passed"] and report["peak_rss_bytes"] < 3 * 2**30
    assert report["peak_rss_bytes"] > report["budget"]["weights"]  # the weights really were paged in


@pytest.mark.slow
def test_gemma_fails_under_its_size(gemma_bundle):
    weights = read_manifest(gemma_bundle).weight_bytes()
    below = _cli(str(gemma_bundle), "--mem-cap", f"{weights // 2 // MIB}MiB")
    assert below.returncode == 1 and "below the model's weights" in below.stderr
    # Above the weights but below what a 512-token prefill needs: the run starts and is stopped.
    over = _cli(str(gemma_bundle), "--mem-cap", f"{int(weights * 1.1) // MIB}MiB", "--prompt-tokens", "512",
                "--new-tokens", "16")
    assert over.returncode == 2, over.stdout + over.stderr
    assert "FAIL" in over.stdout
