"""docs/results.md: every shipped recipe and the peers, measured the same way on the same texts.

    python benchmarks/results.py                      # build what is missing, evaluate, write docs/results.md
    python benchmarks/results.py --recipes phone-3gb --peers optimum-int8 --max-samples 8 --task-samples 20

Recipes: `koedge build --model MODEL --recipe R` (its passes cached under ~/.cache/koedge/build), in a
child process each; the bundle lands in build/results/<recipe>. The fp32 recipe's bundle is the
reference every KL is taken against (unless --fp32 names another).

Peers of the FP32 gemma-3-270m bundle (build/gemma3-fp32):
- optimum-int8: Optimum's own export (`text-generation-with-past`), then ORTQuantizer dynamic INT8
  (AutoQuantizationConfig.avx512_vnni, per-tensor), as Optimum's documentation shows it.
- genai-int4: onnxruntime-genai's model builder, INT4 for CPU, from the same FP32 checkpoint. It needs
  transformers >= 5, so it runs in its own virtual environment (--genai-python); two workarounds:
  transformers 5 nests Gemma 3's rope settings per layer type (the builder reads a flat dict), and the
  default sliding-window KV cache cannot start from an empty past (windowed_kv_cache=false).
Each peer becomes a bundle folder (its ONNX file, the FP32 bundle's tokenizer, a koedge.json describing
its real inputs) so `runtime.evaluate` and `benchmarks/bench_runtime.py` run it like any koedge bundle.
A peer that cannot be built is recorded as a failure with its error, not left out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEERS = ("optimum-int8", "genai-int4")
PEER_NOTES = {
    "optimum-int8": "Optimum's own export (`text-generation-with-past`, the tied embedding written twice), then "
                    "`ORTQuantizer` dynamic INT8 with `AutoQuantizationConfig.avx512_vnni(is_static=False, "
                    "per_channel=False)`, as Optimum's documentation shows it.",
    "genai-int4": "onnxruntime-genai's model builder (`-p int4 -e cpu`) from the same FP32 checkpoint, in its own "
                  "virtual environment (it needs transformers >= 5); workarounds: flat `rope_parameters` for "
                  "Gemma 3 under transformers 5, and `windowed_kv_cache=false` (its sliding-window cache cannot "
                  "start from an empty past).",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 16: "bfloat16"}

GENAI_WRAPPER = r"""
import sys
import transformers

_load = transformers.AutoConfig.from_pretrained.__func__


def _flat_rope(cls, *args, **kwargs):
    # transformers 5 keeps Gemma 3's rope settings per layer type; the builder reads rope_theta,
    # rope_local_base_freq and a flat rope_parameters dict (the full-attention layers' settings).
    config = _load(cls, *args, **kwargs)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "full_attention" in rope:
        config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
        config.rope_theta = rope["full_attention"]["rope_theta"]
        config.rope_parameters = dict(rope["full_attention"])
    return config


transformers.AutoConfig.from_pretrained = classmethod(_flat_rope)
import runpy

sys.argv = ["builder", *sys.argv[1:]]
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
"""


def progress(message: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- building ----------------------------------------------------------------------------------
def uses_group_query_attention(onnx_path: Path) -> bool:
    """GQA graphs (onnxruntime-genai's) can take one preallocated KV buffer as past and present."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return any(node.op_type == "GroupQueryAttention" for node in graph.node)


def graph_io(onnx_path: Path):
    """(inputs, outputs) as TensorSpecs, read from the graph without loading its weights."""
    import onnx

    from runtime.bundle import TensorSpec

    graph = onnx.load(str(onnx_path), load_external_data=False).graph

    def specs(values):
        return [TensorSpec(v.name, ONNX_DTYPES.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type)),
                           [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

    initializers = {init.name for init in graph.initializer}
    return specs([v for v in graph.input if v.name not in initializers]), specs(graph.output)


def write_peer_bundle(staging: Path, fp32: Path, onnx_file: str, name: str, config: dict, seconds: float) -> None:
    """koedge.json for a peer's ONNX file: the FP32 bundle's model facts, the peer's real I/O."""
    from runtime.bundle import LOGITS_TO_KEEP, PassRecord, read_manifest, write_manifest

    manifest = read_manifest(fp32)
    for file_name in TOKENIZER_FILES:
        if (fp32 / file_name).is_file():
            shutil.copy2(fp32 / file_name, staging / file_name)
    inputs, outputs = graph_io(staging / onnx_file)
    manifest.io.inputs, manifest.io.outputs = inputs, outputs
    names = {spec.name for spec in inputs}
    manifest.io.uses_position_ids = "position_ids" in names
    past = next(spec for spec in inputs if spec.name == manifest.io.past_key.format(layer=0))
    manifest.io.kv_dtype = past.dtype
    manifest.io.logits_to_keep = LOGITS_TO_KEEP if LOGITS_TO_KEEP in manifest.io.input_names() else None
    manifest.io.kv_shared_buffer = uses_group_query_attention(staging / onnx_file)
    manifest.onnx_file = onnx_file
    manifest.model.notes = [*manifest.model.notes, f"peer build: {name}"]
    manifest.quantized_weights = True  # runtime.model.CausalLM pre-packs them, as for koedge's quantized bundles
    manifest.passes = [PassRecord(name=f"quantize:peer:{name}", config=config, seconds=round(seconds, 1))]
    write_manifest(staging, manifest)


def build_optimum_int8(checkpoint: Path, fp32: Path, out: Path, work: Path) -> None:
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    from runtime.bundle import staged_folder

    started = time.perf_counter()
    export_dir = work / "optimum-fp32"
    if not (export_dir / "model.onnx").is_file():
        progress(f"Optimum export of {checkpoint} (text-generation-with-past)")
        main_export(str(checkpoint), output=export_dir, task="text-generation-with-past", device="cpu",
                    do_validation=False)
    qconfig = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)
    with staged_folder(out, overwrite=True) as staging:
        progress("ORTQuantizer dynamic INT8 (avx512_vnni, per-tensor)")
        ORTQuantizer.from_pretrained(export_dir, file_name="model.onnx").quantize(
            save_dir=staging, quantization_config=qconfig)
        for extra in staging.glob("*.json"):  # Optimum copies its config files; keep only the model
            extra.unlink()
        config = {"export": "optimum main_export text-generation-with-past",
                  "quantization": {k: str(v) for k, v in qconfig.__dict__.items()}}
        write_peer_bundle(staging, fp32, "model_quantized.onnx", "optimum-int8", config,
                          time.perf_counter() - started)


def build_genai_int4(checkpoint: Path, fp32: Path, out: Path, work: Path, python: str) -> None:
    from runtime.bundle import staged_folder

    if not Path(python).is_file():
        raise RuntimeError(f"no onnxruntime-genai environment at {python} (python -m venv; pip install "
                           "onnxruntime-genai 'transformers>=5' torch==2.13.0 onnx onnx-ir)")
    started = time.perf_counter()
    options = ["windowed_kv_cache=false"]
    with staged_folder(out, overwrite=True) as staging:
        command = [python, "-c", GENAI_WRAPPER, "-i", str(checkpoint), "-o", str(staging), "-p", "int4",
                   "-e", "cpu", "-c", str(work / "genai-cache"), "--extra_options", *options]
        progress("onnxruntime-genai model builder, int4 cpu")
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            raise RuntimeError(lines[-1] if lines else f"builder exited with {done.returncode}")
        version = subprocess.run([python, "-c", "import onnxruntime_genai, transformers; "
                                  "print(onnxruntime_genai.__version__, transformers.__version__)"],
                                 capture_output=True, text=True).stdout.split()
        config = {"builder": "onnxruntime_genai.models.builder", "precision": "int4", "execution_provider": "cpu",
                  "extra_options": options, "onnxruntime_genai": version[:1], "transformers": version[1:2],
                  "workarounds": ["flat rope_parameters for transformers 5", "windowed_kv_cache=false"]}
        write_peer_bundle(staging, fp32, "model.onnx", "genai-int4", config, time.perf_counter() - started)


def build_recipe(recipe: str, args: argparse.Namespace) -> Path:
    """`koedge build` in a child process; a failed build is a result (its error line), not a crash."""
    out = Path(args.out) / recipe
    progress(f"koedge build --model {args.model} --recipe {recipe} --out {out}")
    done = subprocess.run([sys.executable, "-m", "exporter.cli", "build", "--model", args.model, "--recipe", recipe,
                           "--out", str(out)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise RuntimeError(lines[-1] if lines else f"koedge build exited with {done.returncode}")
    return out


def build(name: str, args: argparse.Namespace) -> None:
    from exporter.export.sources import resolve_model

    checkpoint = Path(resolve_model(args.model, progress=progress).path)
    out, work = Path(args.out) / name, Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if name == "optimum-int8":
        build_optimum_int8(checkpoint, Path(args.fp32), out, work)
    else:
        build_genai_int4(checkpoint, Path(args.fp32), out, work, args.genai_python)


# --- measuring ---------------------------------------------------------------------------------
def fingerprint(bundle: Path) -> str:
    """Changes when the bundle is rebuilt: its manifest and the sizes and times of its files."""
    import hashlib

    digest = hashlib.sha256((bundle / "koedge.json").read_bytes())
    for path in sorted(bundle.iterdir()):
        if path.is_file():
            digest.update(f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def evaluate_bundle(bundle: Path, reference: Path | None, args: argparse.Namespace) -> dict:
    """runtime.evaluate on the standard passages (+ NSMC), cached in the bundle's folder by config."""
    from runtime.evaluate import EvalConfig, eval_texts, evaluate
    from runtime.model import CausalLM
    from runtime.session import SessionConfig

    config = EvalConfig(max_samples=args.max_samples, tasks=tuple(args.tasks), task_samples=args.task_samples)
    key = json.loads(json.dumps({"config": asdict(config), "reference": str(reference) if reference else None,
                                 "bundles": [fingerprint(bundle), fingerprint(reference) if reference else None]}))
    cache = Path(args.out) / f"eval-{bundle.name}.json"
    if cache.is_file() and json.loads(cache.read_text()).get("key") == key:
        return json.loads(cache.read_text())["result"]
    session = SessionConfig(threads=args.threads)
    model = CausalLM(bundle, session)
    ref = CausalLM(reference, session) if reference else None
    progress(f"evaluating {bundle} against {reference or 'nothing'}")
    result = evaluate(model, eval_texts(config), ref, config).to_dict()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "result": result}, indent=2, ensure_ascii=False))
    return result


def speed(bundles: list[Path], args: argparse.Namespace) -> dict[str, dict]:
    """Peak RSS, TTFT, decode tok/s from benchmarks/bench_runtime.py (a fresh process per run)."""
    rows_file = Path(args.work) / "speed.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_runtime.py"), *map(str, bundles),
               "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
               "--new-tokens", str(args.new_tokens), "--repeat", str(args.repeat), "--json", str(rows_file)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        progress(f"speed run failed: {done.stderr.strip().splitlines()[-1:]}")
        return {}
    return {Path(row["bundle"]).name: row for row in json.loads(rows_file.read_text())}


# --- report ------------------------------------------------------------------------------------
def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = next((int(line.split()[1]) // 2**20 for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), 0)
    import onnxruntime

    return (f"{cpu}, {os.cpu_count()} cores, {memory} GiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}")


def _cell(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def markdown(rows: list[dict], failures: dict[str, str], args: argparse.Namespace) -> str:
    lines = [
        f"# Results: {args.model}, koedge recipes and peers",
        "",
        f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. Threads: {args.threads}.",
        "Timings (TTFT, tok/s) move with the machine's load; PPL, bits/byte, KL and accuracy do not.",
        "Recipes are `koedge build --recipe NAME` (exporter/recipes/); KL is against the koedge FP32 bundle.",
        "A vocabulary-pruned bundle (phone-small) tokenizes differently: compare it by bits/byte; its PPL is "
        "per its own tokens and its KL is over the shared tokens (runtime/evaluate.py).",
        "",
        f"Texts: `runtime.evaluate.eval_texts` — {args.max_samples} passages of eval-split Korean (KLUE formal + "
        "NSMC informal sentences, whole texts up to 896 UTF-8 bytes, ~225 gemma tokens each), every token scored. "
        "KL(FP32 ‖ peer) per position, mean and 99th percentile, same-top-1: llama.cpp's definitions. "
        f"NSMC: zero-shot, {args.task_samples} balanced eval-split reviews, 95% Wilson interval. "
        f"Speed: `benchmarks/bench_runtime.py`, {args.prompt_tokens}-token prompt, {args.new_tokens} greedy "
        "steps, a fresh process per run (peak RSS = VmHWM).",
        "",
        "| system | size MB | PPL | bits/byte | KL mean | KL p99 | same top-1 | NSMC acc (95% CI) "
        "| peak RSS MiB | TTFT s | decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ev, sp = row["eval"], row.get("speed") or {}
        nsmc = ev["tasks"].get("nsmc")
        lines.append(" | ".join([
            f"| {row['label']}", f"{row['size'] / 1e6:,.0f}", f"{ev['perplexity']:.2f}", f"{ev['bits_per_byte']:.4f}",
            _cell(ev["kl_mean"], ".4f"), _cell(ev["kl_p99"], ".3f"),
            "–" if ev["same_top1"] is None else f"{ev['same_top1']:.1%}",
            "–" if nsmc is None else f"{nsmc['accuracy']:.1%} ({nsmc['ci_low']:.1%}–{nsmc['ci_high']:.1%})",
            "–" if not sp.get("peak_rss") else f"{sp['peak_rss'] / 2**20:,.0f}",
            _cell(sp.get("ttft_seconds"), ".2f"), _cell(sp.get("decode_tokens_per_second"), ".1f")]) + " |")
    if failures:
        lines += ["", "## Peers that could not be built or measured", ""]
        lines += [f"- **{name}**: {error}" for name, error in failures.items()]
    lines += ["", "## Peer builds", ""]
    lines += [f"- **{name}**: {how}" for name, how in PEER_NOTES.items()]
    lines += ["", "Reproduce: `python benchmarks/results.py` (bundles are kept in build/results/).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32", default=None, help="the reference FP32 bundle (default: the fp32 recipe's)")
    parser.add_argument("--model", default="gemma-3-270m", help="model the recipes and the peers are built from")
    parser.add_argument("--recipes", default="fp32,phone-3gb,phone-int4,phone-small,int8-static")
    parser.add_argument("--out", default=str(ROOT / "build" / "results"), help="bundles and eval caches")
    parser.add_argument("--work", default="/tmp/koedge-peers", help="scratch: Optimum export, builder cache")
    parser.add_argument("--genai-python", default="/tmp/C/genai-venv/bin/python")
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--max-samples", type=int, default=64)
    parser.add_argument("--tasks", default="nsmc")
    parser.add_argument("--task-samples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "results.md"))
    parser.add_argument("--build-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.tasks = [name for name in args.tasks.split(",") if name and name != "none"]
    args.fp32 = args.fp32 or str(Path(args.out) / "fp32")
    if args.build_child:  # a fresh process per build: torch and the export's memory go when it ends
        build(args.build_child, args)
        return

    from runtime.bundle import read_manifest

    rows: list[dict] = []
    failures: dict[str, str] = {}
    for recipe in [name for name in args.recipes.split(",") if name]:
        try:
            rows.append({"label": f"koedge {recipe}", "bundle": build_recipe(recipe, args)})
        except RuntimeError as err:
            failures[f"koedge {recipe}"] = str(err)
    fp32 = Path(args.fp32)
    if not (fp32 / "koedge.json").is_file():
        raise SystemExit(f"no FP32 reference bundle at {fp32} (build the fp32 recipe or pass --fp32)")
    if not any(row["bundle"].resolve() == fp32.resolve() for row in rows):
        rows.insert(0, {"label": "koedge FP32 (reference)", "bundle": fp32})
    for name in [peer for peer in args.peers.split(",") if peer]:
        folder = Path(args.out) / name
        if args.rebuild or not (folder / "koedge.json").is_file():
            done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--build-child", name],
                                  stderr=subprocess.PIPE, text=True)
            if done.returncode != 0:
                lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
                failures[name] = lines[-1] if lines else f"exit {done.returncode}"
                progress(f"{name} failed: {failures[name]}")
                continue
        rows.append({"label": name, "bundle": folder})
    for row in list(rows):
        try:
            reference = None if row["bundle"].resolve() == fp32.resolve() else fp32
            row["eval"] = evaluate_bundle(row["bundle"], reference, args)
            row["size"] = read_manifest(row["bundle"]).weight_bytes()
        except Exception as err:  # a peer that builds but does not run is a result too
            failures[row["label"]] = f"evaluation failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
            progress(traceback.format_exc())
            rows.remove(row)
    if not args.no_speed:
        speeds = speed([row["bundle"] for row in rows], args)
        for row in rows:
            row["speed"] = speeds.get(row["bundle"].name)
    Path(args.doc).write_text(markdown(rows, failures, args), encoding="utf-8")
    progress(f"wrote {args.doc}")
    print(Path(args.doc).read_text())


if __name__ == "__main__":
    main()
