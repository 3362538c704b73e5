"""The quantize pass: an FP32 bundle in, a quantized bundle out, with what it cost in accuracy.

INT4 weight-only (exporter/quantize/int4.py) or INT8 static (exporter/quantize/int8.py) writes the
new graph; this module stages the bundle, carries the tokenizer and config files over, records the
pass in the manifest, and judges the result against the source bundle on Korean evaluation text
(runtime.evaluate): report.json plus a readable report.md.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Callable

from runtime.bundle import MANIFEST, Manifest, PassRecord, read_manifest, staged_folder, write_manifest
from runtime.errors import KoedgeError

GRAPH_FILES = ("model.onnx", "model.onnx.data")
REPORT_JSON = "report.json"
REPORT_TABLE = "report.md"
GGUF_EXACT = "gguf-exact"  # the pass that carries a GGUF's blocks into the graph (exporter/quantize/gguf.py)


@dataclass
class QuantizeResult:
    folder: Path
    report: dict[str, Any]


def pass_name(method_config: Any) -> str:
    from exporter.quantize.gguf import GgufConfig
    from exporter.quantize.int4 import Int4Config

    if isinstance(method_config, GgufConfig):
        return GGUF_EXACT
    return "quantize-int4" if isinstance(method_config, Int4Config) else "quantize-int8-static"


def is_gguf_exact(folder: Path) -> bool:
    """Whether the bundle already holds a GGUF's own blocks (quantizing it again would round twice)."""
    return any(record.name == GGUF_EXACT for record in read_manifest(folder).passes)


def bundle_bytes(folder: Path, exclude: tuple[str, ...] = ()) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and path.name not in exclude)


def _check_source(src: Path) -> Manifest:
    manifest = read_manifest(src)
    if any(record.name == GGUF_EXACT for record in manifest.passes):
        raise KoedgeError(f"{src} is GGUF-exact: its weights are already the GGUF's quantized blocks; to quantize "
                          f"from float instead, export with --dtype fp32 and quantize that bundle")
    done = [record.name for record in manifest.passes if record.name.startswith("quantize")]
    if done:
        raise KoedgeError(f"{src} is already quantized ({done[0]}); quantize its FP32 bundle instead")
    if manifest.onnx_file != GRAPH_FILES[0]:
        raise KoedgeError(f"{src}: expected the graph in {GRAPH_FILES[0]}, manifest says {manifest.onnx_file}")
    return manifest


def _run_method(src: Path, folder: Path, method_config: Any, progress: Callable[[str], None]) -> dict:
    from exporter.quantize.gguf import GgufConfig, gguf_exact
    from exporter.quantize.int4 import Int4Config, quantize_int4

    if isinstance(method_config, GgufConfig):
        return gguf_exact(src, folder, method_config, progress)
    if isinstance(method_config, Int4Config):
        plan = None
        if method_config.size_budget_mb or method_config.algo == "best":
            from exporter.quantize.mixed import plan_bits

            plan = plan_bits(src, method_config, progress)
        return quantize_int4(src, folder, method_config, progress, plan)
    from exporter.quantize.int8 import quantize_int8_static

    return quantize_int8_static(src, folder, method_config, progress)


def _as_dict(value: Any) -> dict:
    if is_dataclass(value):
        return asdict(value)
    return dict(value)


def evaluate_against(src: Path, folder: Path, eval_config: Any, progress: Callable[[str], None]) -> dict:
    """Perplexity, KL and same-top-1 of the new bundle vs its source on the fixed Korean eval texts."""
    from runtime.evaluate import EvalConfig, eval_texts, evaluate
    from runtime.model import CausalLM

    config = eval_config or EvalConfig()
    texts = eval_texts(config)
    progress(f"evaluating against {src.name} on {len(texts)} Korean eval texts")
    reference = CausalLM(src)
    source = _as_dict(evaluate(reference, texts, None, config))
    quantized = _as_dict(evaluate(CausalLM(folder), texts, reference, config))
    return {"eval_config": _as_dict(config), "source": source, "quantized": quantized}


def format_report(report: dict) -> str:
    """A short Markdown table: size, time, accuracy vs the source bundle, and the recipe."""
    mb = 1e6
    lines = [f"# {report['pass']}: {report['source_bundle']} -> {report['bundle']}", "",
             "| | source | quantized |", "| --- | --- | --- |",
             f"| bundle size (MB) | {report['bytes_before'] / mb:,.1f} | {report['bytes_after'] / mb:,.1f} |",
             f"| weights (model.onnx + data, MB) | {report['weight_bytes_before'] / mb:,.1f} | "
             f"{report['weight_bytes_after'] / mb:,.1f} |"]
    accuracy = report.get("accuracy")
    if accuracy:
        source, quantized = accuracy["source"], accuracy["quantized"]
        ppl, ppl_q = source.get("perplexity"), quantized.get("perplexity")
        change = f" ({(ppl_q / ppl - 1) * 100:+.1f}%)" if ppl and ppl_q else ""
        lines += [f"| perplexity | {ppl:.3f} | {ppl_q:.3f}{change} |",
                  f"| mean KL vs source | 0 | {quantized.get('kl_mean', float('nan')):.4f} |",
                  f"| KL p99 | 0 | {quantized.get('kl_p99', float('nan')):.4f} |",
                  f"| same top-1 | 100% | {quantized.get('same_top1', float('nan')) * 100:.1f}% |"]
    lines += [f"| time (s) | | quantize {report['quantize_seconds']:.0f}"
              + (f", eval {report['eval_seconds']:.0f}" if accuracy else "") + " |", "",
              "Recipe: `" + json.dumps(report["config"], ensure_ascii=False) + "`"]
    results = report["results"]
    if "matmuls_int4" in results:
        lines.append(f"Mix: {results['matmuls_int4']} MatMuls INT4, {results['matmuls_int8']} INT8, "
                     f"embedding {results.get('embedding')}"
                     + (f" with {results['hot_rows']:,} Korean rows at 8 bits" if results.get("hot_rows") else "")
                     + (" (shared with the tied LM head)" if results.get("tied_shared") else ""))
    if "tensors_exact" in results:
        types = ", ".join(f"{count} {qtype}" for qtype, count in sorted(results["types"].items()))
        lines.append(f"GGUF-exact: {results['tensors_exact']} tensors from {results['gguf']} ({types}); "
                     f"{len(results['matmuls_float'])} MatMuls left FP32"
                     + ("; one table shared by the embedding and the tied LM head" if results.get("tied_shared") else ""))
    return "\n".join(lines) + "\n"


def quantize_bundle(src: str | Path, out: str | Path, method_config: Any, overwrite: bool = False,
                    progress: Callable[[str], None] = print, evaluate: bool = True,
                    eval_config: Any = None) -> QuantizeResult:
    """Quantize the bundle at `src` into a new bundle at `out` (atomically) and report the cost."""
    src, out = Path(src), Path(out)
    manifest = _check_source(src)
    if src.resolve() == out.resolve():
        raise KoedgeError("the quantized bundle needs its own folder (--out must differ from the source)")
    name = pass_name(method_config)
    started = time.perf_counter()
    with staged_folder(out, overwrite=overwrite) as folder:
        for path in src.iterdir():
            if path.is_file() and path.name not in (*GRAPH_FILES, MANIFEST, REPORT_JSON, REPORT_TABLE):
                shutil.copy2(path, folder / path.name)
        results = _run_method(src, folder, method_config, progress)
        quantize_seconds = time.perf_counter() - started
        manifest.passes.append(PassRecord(name, _as_dict(method_config), round(quantize_seconds, 1), results))
        manifest.quantized_weights = True
        write_manifest(folder, manifest)
        report = {
            "pass": name, "source_bundle": str(src), "bundle": str(out), "config": _as_dict(method_config),
            "bytes_before": bundle_bytes(src, (REPORT_JSON, REPORT_TABLE)),
            "weight_bytes_before": sum((src / f).stat().st_size for f in GRAPH_FILES if (src / f).exists()),
            "weight_bytes_after": sum((folder / f).stat().st_size for f in GRAPH_FILES if (folder / f).exists()),
            "quantize_seconds": round(quantize_seconds, 1), "results": results,
        }
        if evaluate:
            eval_started = time.perf_counter()
            report["accuracy"] = evaluate_against(src, folder, eval_config, progress)
            report["eval_seconds"] = round(time.perf_counter() - eval_started, 1)
            manifest.passes[-1].results["accuracy"] = {
                key: report["accuracy"]["quantized"].get(key)
                for key in ("perplexity", "kl_mean", "kl_p99", "same_top1")}
            manifest.passes[-1].results["source_perplexity"] = report["accuracy"]["source"].get("perplexity")
        write_manifest(folder, manifest)
        # Sizes leave out the two report files on both sides (the source may carry its own).
        report["bytes_after"] = bundle_bytes(folder, (REPORT_JSON, REPORT_TABLE))
        (folder / REPORT_JSON).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
        (folder / REPORT_TABLE).write_text(format_report(report), encoding="utf-8")
        write_manifest(folder, manifest)
    return QuantizeResult(out, report)
