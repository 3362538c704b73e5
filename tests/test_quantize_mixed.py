"""Mixed 4/8-bit MatMuls from measured sensitivity: the size budget is met, spent on the most sensitive
MatMuls, and refused when even all-4-bit cannot fit; `best` picks a quantizer per MatMul."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import requires_data
from exporter.quantize.bundle import bundle_bytes, quantize_bundle
from exporter.quantize.int4 import Int4Config
from exporter.quantize.mixed import choose_int8, packed_bytes, weighted_error
from runtime.errors import KoedgeError

QUIET = dict(progress=lambda message: None, evaluate=False)


def test_packed_bytes_is_what_the_quantizer_writes():
    from exporter.quantize.int4 import quantize_weight

    w = np.random.default_rng(0).normal(size=(80, 48)).astype(np.float32)
    for bits in (4, 8):
        assert quantize_weight(w, bits, Int4Config(algo="rtn")).nbytes == packed_bytes(80, 48, bits, 32)


def test_choose_int8_spends_the_budget_on_error_per_byte():
    candidates = [("a", 10.0, 100), ("b", 50.0, 100), ("c", 30.0, 50), ("d", 0.0, 1)]
    assert choose_int8(candidates, 150) == {"b", "c"}
    assert choose_int8(candidates, 49) == set()
    assert weighted_error(np.ones((2, 3)), np.zeros((2, 3)), np.array([1.0, 2.0])) == 9.0


@requires_data
@pytest.mark.parametrize("blocks", [{}, {"o_proj": 64, "down_proj": 64}])  # per-MatMul blocks: the plan counts them
def test_size_budget_is_met_with_the_sensitive_matmuls_at_8_bits(tiny_bundles, tmp_path, blocks):
    src = tiny_bundles["llama"]
    low = quantize_bundle(src, tmp_path / "q4", Int4Config(algo="rtn", int8=[], blocks=blocks), **QUIET)
    high = quantize_bundle(src, tmp_path / "q8", Int4Config(algo="rtn", int8=["/"], blocks=blocks), **QUIET)
    size4, size8 = (bundle_bytes(r.folder, ("report.json", "report.md")) for r in (low, high))
    budget = size4 + 0.75 * (size8 - size4)
    config = Int4Config(algo="best", size_budget_mb=budget / 1e6, sensitivity_samples=4, blocks=blocks)
    mixed = quantize_bundle(src, tmp_path / "mixed", config, **QUIET)
    results = mixed.report["results"]
    assert 0 < results["matmuls_int8"] < results["matmuls_int8"] + results["matmuls_int4"]
    assert bundle_bytes(mixed.folder, ("report.json", "report.md")) <= budget
    with pytest.raises(KoedgeError, match="below the smallest bundle"):
        quantize_bundle(src, tmp_path / "tiny", Int4Config(algo="rtn", size_budget_mb=size4 / 2e6), **QUIET)
    assert not (tmp_path / "tiny").exists()
