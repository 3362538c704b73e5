"""`koedge build`: run a recipe's passes in order, each cached by the hash of its input and config.

Every bundle-producing pass writes to `~/.cache/koedge/build/<key>-<pass>/` (atomically, so an
interrupted build resumes from the last finished pass); checks (validate, eval) cache their JSON
results the same way. Changing the last pass's config re-runs only that pass; `--force` redoes all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from exporter.recipes import PassSpec, Recipe
from exporter.sources import ResolvedModel, cache_root, resolve_model
from runtime.bundle import read_manifest, staged_folder
from runtime.errors import KoedgeError

BUILD_FORMAT = 1  # bump to invalidate every cached pass when pass semantics change


@dataclass
class PassOutcome:
    spec: PassSpec
    seconds: float
    cached: bool
    folder: Path | None = None  # the bundle this pass produced (None for checks)
    results: dict[str, Any] = field(default_factory=dict)


@dataclass
class BuildState:
    """What flows between passes: the checkpoint before export, then the current bundle."""

    model: ResolvedModel
    key: str
    checkpoint: Path
    bundle: Path | None = None
    reference: Path | None = None  # the FP32 export, judged against by eval
    model_passes: list[PassSpec] = field(default_factory=list)


def pass_key(previous: str, spec: PassSpec) -> str:
    payload = json.dumps([BUILD_FORMAT, previous, spec.name, spec.config], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_cache() -> Path:
    folder = cache_root() / "build"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise KoedgeError(f"build cache {folder} is not writable: {err.strerror}") from err
    return folder


def _known(config: dict, allowed: type, pass_name: str) -> dict:
    """Refuse config keys the pass's dataclass does not have (typos would be silently ignored)."""
    fields = set(getattr(allowed, "__dataclass_fields__", {}))
    unknown = sorted(set(config) - fields)
    if unknown:
        raise KoedgeError(f"pass '{pass_name}': unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
    return config


# --- passes ---------------------------------------------------------------------------------------

def run_export(state: BuildState, spec: PassSpec, out: Path, progress: Callable[[str], None]) -> dict:
    from exporter.export import ExportConfig, export_model

    config = ExportConfig(**_known(spec.config, ExportConfig, spec.name))
    source = state.model
    if state.model_passes:  # pruning passes rewrote the checkpoint
        source = ResolvedModel(state.model.name, state.checkpoint, state.model.source, state.model.revision,
                               state.model.trust_remote_code, list(state.model.notes))
    result = export_model(source, out, config, overwrite=True, progress=progress)
    return {"bundle_bytes": result.bundle_bytes, "parity": result.parity}


BUNDLE_PASSES: dict[str, Callable[[BuildState, PassSpec, Path, Callable[[str], None]], dict]] = {
    "export": run_export,
}
CHECK_PASSES: dict[str, Callable[[BuildState, PassSpec, Callable[[str], None]], dict]] = {}
MODEL_PASSES: dict[str, Callable[[BuildState, PassSpec, Path, Callable[[str], None]], dict]] = {}


def _require_implemented(recipe: Recipe) -> None:
    known = {**BUNDLE_PASSES, **CHECK_PASSES, **MODEL_PASSES}
    missing = [spec.name for spec in recipe.passes if spec.name not in known]
    if missing:
        raise KoedgeError(f"recipe '{recipe.name}' uses pass(es) this koedge cannot run yet: {', '.join(missing)}")


def run_recipe(model_name: str, recipe: Recipe, out: Path, force: bool = False, overwrite: bool = False,
               progress: Callable[[str], None] = print) -> list[PassOutcome]:
    """Run every pass; copy the final bundle to `out` with a report.json of all passes."""
    _require_implemented(recipe)
    if out.exists() and not overwrite:
        raise KoedgeError(f"{out} exists; pass --overwrite to replace it")
    cache = build_cache()
    model = resolve_model(model_name, progress=progress)
    state = BuildState(model=model, key=pass_key(model.revision or str(model.path), PassSpec(model.name)),
                       checkpoint=model.path)
    outcomes: list[PassOutcome] = []
    for index, spec in enumerate(recipe.passes, 1):
        state.key = pass_key(state.key, spec)
        label = f"[{index}/{len(recipe.passes)}] {spec.name}"
        started = time.perf_counter()
        if spec.name in CHECK_PASSES:
            record = cache / f"{state.key}-{spec.name}.json"
            cached = record.is_file() and not force
            if cached:
                results = json.loads(record.read_text())
            else:
                results = CHECK_PASSES[spec.name](state, spec, progress)
                record.write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str))
            outcome = PassOutcome(spec, time.perf_counter() - started, cached, None, results)
        else:
            folder = cache / f"{state.key}-{spec.name}"
            cached = (folder / ("config.json" if spec.name in MODEL_PASSES else "koedge.json")).is_file() and not force
            if cached:
                results = json.loads((folder.parent / f"{folder.name}.results.json").read_text())
            else:
                runner = MODEL_PASSES.get(spec.name) or BUNDLE_PASSES[spec.name]
                if folder.exists():
                    shutil.rmtree(folder)
                results = runner(state, spec, folder, progress)
                (folder.parent / f"{folder.name}.results.json").write_text(
                    json.dumps(results, indent=2, ensure_ascii=False, default=str))
            if spec.name in MODEL_PASSES:
                state.checkpoint = folder
                state.model_passes.append(spec)
            else:
                state.bundle = folder
                if spec.name == "export":
                    state.reference = folder
            outcome = PassOutcome(spec, time.perf_counter() - started, cached, folder, results)
        outcomes.append(outcome)
        progress(f"{label} {'cached' if outcome.cached else 'done'} in {outcome.seconds:.1f} s")
    if state.bundle is None:
        raise KoedgeError(f"recipe '{recipe.name}' produced no bundle")
    _publish(state.bundle, out, recipe, model, outcomes)
    return outcomes


def _publish(bundle: Path, out: Path, recipe: Recipe, model: ResolvedModel, outcomes: list[PassOutcome]) -> None:
    """Copy the final bundle out of the cache (hard links where possible) and add report.json."""
    with staged_folder(out, overwrite=True) as staging:
        for path in bundle.iterdir():
            target = staging / path.name
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)
        report = {
            "model": model.name, "recipe": recipe.name, "description": recipe.description,
            "notes": read_manifest(bundle).model.notes,
            "passes": [{"pass": o.spec.name, "config": o.spec.config, "seconds": round(o.seconds, 1),
                        "cached": o.cached, "results": o.results} for o in outcomes],
        }
        (staging / "report.json").unlink(missing_ok=True)  # a hard link into the cache: never write through it
        (staging / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str))
