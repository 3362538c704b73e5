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
from exporter.export.sources import ResolvedModel, cache_root, resolve_model
from runtime.bundle import MANIFEST, FileRecord, read_manifest, sha256_of, staged_folder
from runtime.errors import KoedgeError

BUILD_FORMAT = 8  # bump to invalidate every cached pass when pass semantics change (2: fused export, 3: dtype auto = gguf, 4: vocabulary defaults, 5: rotary in GQA + max_context, INT4 hot rows, 6: Reshape chains folded, packed MatMulNBits, 7: tied_gather_bytes for the budget, 8: kv_window_offset)


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
    teacher: Path | None = None  # the checkpoint before structured pruning, distilled from by heal
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
    from exporter.export.convert import ExportConfig, export_model

    config = ExportConfig(**_known(spec.config, ExportConfig, spec.name))
    source = state.model
    if state.model_passes:  # pruning passes rewrote the checkpoint
        # Vocabulary pruning keeps whole rows of the GGUF's tensors, so the GGUF-exact form still applies;
        # structured pruning cuts rows into pieces that no longer match the GGUF's blocks.
        vocab_only = all(done.name == "prune-vocab" for done in state.model_passes)
        source = ResolvedModel(state.model.name, state.checkpoint, state.model.source, state.model.revision,
                               state.model.trust_remote_code, list(state.model.notes),
                               gguf=state.model.gguf if vocab_only else None)
    reference = None
    if config.weights(source) == "gguf":  # the FP32 export is kept beside it: eval's reference
        reference = out.with_name(out.name + "-fp32")
        if reference.exists():
            shutil.rmtree(reference)
    result = export_model(source, out, config, overwrite=True, progress=progress, reference=reference)
    return {"bundle_bytes": result.bundle_bytes, "parity": result.parity,
            **({"reference": str(reference)} if reference else {})}


def run_quantize(state: BuildState, spec: PassSpec, out: Path, progress: Callable[[str], None]) -> dict:
    from exporter.quantize.calibration import CalibrationConfig
    from exporter.quantize.bundle import is_gguf_exact, quantize_bundle

    if is_gguf_exact(state.bundle):  # quantizing the GGUF's blocks again would round twice
        reason = ("the bundle is GGUF-exact (the source's own quantized blocks); set dtype = \"fp32\" in the "
                  "export pass to quantize from float instead")
        progress(f"{spec.name} skipped: {reason}")
        return {"skipped": reason}
    if spec.name == "quantize-int4":
        from exporter.quantize.int4 import Int4Config

        config = Int4Config(**_known(spec.config, Int4Config, spec.name))
    else:
        from exporter.quantize.int8 import Int8StaticConfig

        options = dict(spec.config)
        calibration = CalibrationConfig(**_known(options.pop("calibration", {}), CalibrationConfig, spec.name))
        config = Int8StaticConfig(calibration=calibration, **_known(options, Int8StaticConfig, spec.name))
    config.check()
    result = quantize_bundle(state.bundle, out, config, overwrite=True, progress=progress, evaluate=False)
    report = result.report
    return {key: report.get(key) for key in ("bytes_before", "bytes_after", "weight_bytes_before",
                                             "weight_bytes_after", "quantize_seconds", "results")}


def run_prune(state: BuildState, spec: PassSpec, out: Path, progress: Callable[[str], None]) -> dict:
    from exporter.prune.pipeline import PruneOptions, prune_checkpoint
    from exporter.prune.structured import StructuredConfig
    from exporter.prune.vocab import VocabConfig

    options = dict(spec.config)
    eval_texts = int(options.pop("eval_texts", 0))
    if spec.name == "prune-vocab":
        vocab = VocabConfig(**_known(options, VocabConfig, spec.name))
        vocab.check()
        prune = PruneOptions(vocab=vocab, eval_texts=eval_texts)
    else:
        prune = PruneOptions(structured=StructuredConfig(**_known(options, StructuredConfig, spec.name)),
                             eval_texts=eval_texts)
    source = ResolvedModel(state.model.name, state.checkpoint, state.model.source, state.model.revision,
                           state.model.trust_remote_code, list(state.model.notes))
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    results = prune_checkpoint(source, partial, prune, progress)
    partial.rename(out)
    return results


def run_heal(state: BuildState, spec: PassSpec, out: Path, progress: Callable[[str], None]) -> dict:
    from exporter.prune.heal import HealConfig, heal_checkpoint

    config = HealConfig(**_known(spec.config, HealConfig, spec.name))
    config.check()
    if state.teacher is None:
        raise KoedgeError("pass 'heal' needs a 'prune-structured' pass before it (its input is the teacher)")
    model = state.model

    def resolved(path: Path) -> ResolvedModel:
        return ResolvedModel(model.name, path, model.source, model.revision, model.trust_remote_code, list(model.notes))

    return heal_checkpoint(resolved(state.teacher), resolved(state.checkpoint), out, config,
                           out.with_name(out.name + ".work"), progress)


def run_validate(state: BuildState, spec: PassSpec, progress: Callable[[str], None]) -> dict:
    from dataclasses import asdict

    from runtime.memory import parse_size
    from runtime.validate import ValidateConfig, validate

    options = dict(spec.config)
    options["mem_cap"] = parse_size(str(options.get("mem_cap", "3GiB")))
    config = ValidateConfig(**_known(options, ValidateConfig, spec.name))
    progress(f"validating under {spec.config.get('mem_cap', '3GiB')} "
             f"({config.prompt_tokens} prompt + {config.new_tokens} new tokens)")
    report = validate(state.bundle, config)
    if not report.passed:
        raise KoedgeError(f"validate FAILED: {report.verdict}")
    speed = report.decode_tokens_per_second
    progress(f"{report.verdict}: peak RSS {report.peak_rss_bytes / 2**20:,.0f} MiB, TTFT {report.ttft_seconds:.2f} s, "
             f"decode {speed:.1f} tok/s" if speed else report.verdict)
    return asdict(report)


def run_eval(state: BuildState, spec: PassSpec, progress: Callable[[str], None]) -> dict:
    from runtime.evaluate import EvalConfig, eval_texts, evaluate
    from runtime.model import CausalLM

    options = dict(spec.config)
    if "tasks" in options:
        options["tasks"] = tuple(options["tasks"])
    config = EvalConfig(**_known(options, EvalConfig, spec.name))
    texts = eval_texts(config)
    candidate = CausalLM(state.bundle)
    results: dict[str, Any] = {}
    if state.reference and state.reference != state.bundle:
        reference = CausalLM(state.reference)
        progress(f"evaluating the bundle against the FP32 reference on {len(texts)} Korean passages")
        bundle = evaluate(candidate, texts, reference=reference, config=config)
        results["bundle"] = bundle.to_dict()
        if bundle.reference_perplexity is not None and not config.tasks:
            # Same tokenization: the comparison already scored the reference on every token.
            results["reference"] = {"perplexity": bundle.reference_perplexity,
                                    "bits_per_byte": bundle.reference_bits_per_byte, "tokens": bundle.tokens}
        else:
            progress("evaluating the FP32 reference on its own (its tokenization or tasks differ)")
            results["reference"] = evaluate(reference, texts, config=config).to_dict()
    else:
        progress(f"evaluating the bundle on {len(texts)} Korean passages")
        results["bundle"] = evaluate(candidate, texts, config=config).to_dict()
    return results


BUNDLE_PASSES: dict[str, Callable[[BuildState, PassSpec, Path, Callable[[str], None]], dict]] = {
    "export": run_export,
    "quantize-int4": run_quantize,
    "quantize-int8-static": run_quantize,
}
MODEL_PASSES: dict[str, Callable[[BuildState, PassSpec, Path, Callable[[str], None]], dict]] = {
    "prune-vocab": run_prune,
    "prune-structured": run_prune,
    "heal": run_heal,
}
CHECK_PASSES: dict[str, Callable[[BuildState, PassSpec, Callable[[str], None]], dict]] = {
    "validate": run_validate,
    "eval": run_eval,
}


def _require_implemented(recipe: Recipe) -> None:
    known = {**BUNDLE_PASSES, **CHECK_PASSES, **MODEL_PASSES}
    missing = [spec.name for spec in recipe.passes if spec.name not in known]
    if missing:
        raise KoedgeError(f"recipe '{recipe.name}' uses pass(es) this koedge cannot run yet: {', '.join(missing)}")


def run_recipe(model_name: str, recipe: Recipe, out: Path, force: bool = False,
               progress: Callable[[str], None] = print) -> list[PassOutcome]:
    """Run every pass; copy the final bundle to `out` with a report.json of all passes.

    `out` is replaced when it is an earlier koedge bundle (builds are reproducible from the cache);
    any other existing path is refused.
    """
    _require_implemented(recipe)
    if out.exists() and not (out / "koedge.json").is_file():
        raise KoedgeError(f"{out} exists and is not a koedge bundle; choose another --out")
    cache = build_cache()
    model = resolve_model(model_name, progress=progress)
    state = BuildState(model=model, key=pass_key(model.revision or str(model.path), PassSpec(model.name)),
                       checkpoint=model.path)
    outcomes: list[PassOutcome] = []
    for index, spec in enumerate(recipe.passes, 1):
        state.key = pass_key(state.key, spec)
        label = f"[{index}/{len(recipe.passes)}] {spec.name}"
        if spec.name == "prune-structured" and state.teacher is None:
            state.teacher = state.checkpoint
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
            elif not results.get("skipped"):
                state.bundle = folder
                if spec.name == "export":
                    state.reference = Path(results.get("reference") or folder)
            outcome = PassOutcome(spec, time.perf_counter() - started, cached, folder, results)
        outcomes.append(outcome)
        progress(f"{label} {'cached' if outcome.cached else 'done'} in {outcome.seconds:.1f} s")
    if state.bundle is None:
        raise KoedgeError(f"recipe '{recipe.name}' produced no bundle")
    _publish(state.bundle, out, recipe, model, outcomes)
    return outcomes


def _publish(bundle: Path, out: Path, recipe: Recipe, model: ResolvedModel, outcomes: list[PassOutcome]) -> None:
    """Copy the final bundle out of the cache and add report.json.

    A copy, not a hard link: onnx refuses external data in a file with several links ("potential
    hardlink attack"), so a linked cache entry could no longer be read by the next pass.
    """
    with staged_folder(out, overwrite=True) as staging:
        for path in bundle.iterdir():
            shutil.copy2(path, staging / path.name)
        report = {
            "model": model.name, "recipe": recipe.name, "description": recipe.description,
            "notes": read_manifest(bundle).model.notes,
            "passes": [{"pass": o.spec.name, "config": o.spec.config, "seconds": round(o.seconds, 1),
                        "cached": o.cached, "results": o.results} for o in outcomes],
        }
        (staging / "report.json").unlink(missing_ok=True)
        (staging / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str))
        manifest = read_manifest(staging)  # the file table must describe the report as it is now
        path = staging / "report.json"
        manifest.files["report.json"] = FileRecord(path.stat().st_size, sha256_of(path))
        (staging / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")


def _mb(value: float | None) -> str:
    return "–" if value is None else f"{value / 1e6:,.0f}"


def format_summary(recipe: Recipe, outcomes: list[PassOutcome]) -> str:
    """One table: what each pass took, then size, accuracy vs FP32 and the validated memory and speed."""
    lines = [f"recipe {recipe.name}: {recipe.description}", "",
             "| pass | time s | cached | result |", "| --- | ---: | --- | --- |"]
    final: dict[str, Any] = {}
    for outcome in outcomes:
        results, summary = outcome.results, ""
        if outcome.folder is not None and (outcome.folder / "koedge.json").is_file():
            final["size"] = sum(p.stat().st_size for p in outcome.folder.iterdir() if p.is_file())
            summary = f"bundle {_mb(final['size'])} MB"
        if outcome.spec.name == "validate":
            final["validate"] = results
            summary = results.get("verdict", "")
        if outcome.spec.name == "eval":
            final["eval"] = results
            summary = f"PPL {results['bundle']['perplexity']:.2f}"
        lines.append(f"| {outcome.spec.name} | {outcome.seconds:.1f} | {'yes' if outcome.cached else 'no'} | {summary} |")
    lines += ["", "| size MB | PPL | bits/byte | PPL vs FP32 | KL | same-top-1 | peak RSS MiB | cap | TTFT s | decode tok/s |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    bundle = final.get("eval", {}).get("bundle", {})
    reference = final.get("eval", {}).get("reference", {})
    check = final.get("validate", {})

    def number(value: Any, digits: int, scale: float = 1.0, suffix: str = "") -> str:
        return "–" if value is None else f"{value * scale:,.{digits}f}{suffix}"

    delta = None
    if bundle.get("perplexity") and reference.get("perplexity"):
        delta = bundle["perplexity"] / reference["perplexity"] - 1
    lines.append(" | ".join([
        "| " + _mb(final.get("size")), number(bundle.get("perplexity"), 2), number(bundle.get("bits_per_byte"), 4),
        "reference" if not reference else number(delta, 1, 100, "%"), number(bundle.get("kl_mean"), 4),
        number(bundle.get("same_top1"), 1, 100, "%"), number(check.get("peak_rss_bytes"), 0, 1 / 2**20),
        "PASS" if check.get("passed") else ("–" if not check else "FAIL"),
        number(check.get("ttft_seconds"), 2), number(check.get("decode_tokens_per_second"), 1) + " |"]))
    return "\n".join(lines)
