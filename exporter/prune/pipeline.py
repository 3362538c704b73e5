"""The prune pass: shrink the torch model (vocabulary, structure, sparsity), then export it as a bundle.

Pruning happens before export so that ONNX shapes really get smaller. The pruned checkpoint
records what was done (`koedge-passes.json`, and `token_map.json` after vocabulary pruning); the
export copies both into the bundle, so the manifest's history starts with the prune pass.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from runtime.errors import KoedgeError
from exporter.prune.sparsity import SparsityConfig
from exporter.prune.structured import StructuredConfig
from exporter.prune.vocab import VocabConfig

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
SKIP_FILES = ("koedge-source.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
STALE_TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json")


@dataclass
class PruneOptions:
    vocab: VocabConfig | None = None
    structured: StructuredConfig = field(default_factory=StructuredConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    eval_texts: int = 100  # eval-split texts for bits per byte before/after (0: skip)

    @property
    def active(self) -> bool:
        return self.vocab is not None or self.structured.active or self.sparsity.sparsity > 0


def refuse_bundle(name_or_path: str) -> None:
    """Pruning works on the torch model; an exported (let alone quantized) bundle is the wrong input."""
    from runtime.bundle import MANIFEST, read_manifest

    folder = Path(name_or_path).expanduser()
    if (folder / MANIFEST).is_file():
        manifest = read_manifest(folder)
        quantized = [r.name for r in manifest.passes if r.name.startswith("quantize")]
        if quantized:
            raise KoedgeError(f"{folder} is already quantized ({quantized[0]}): prune before quantizing — "
                              f"koedge prune --model {manifest.model.name} ..., then koedge quantize the result")
        raise KoedgeError(f"{folder} is an exported bundle; prune the model it came from: "
                          f"koedge prune --model {manifest.model.name} ...")
    config = folder / "config.json"
    if config.is_file() and "quantization_config" in json.loads(config.read_text(encoding="utf-8")):
        raise KoedgeError(f"{folder} is a quantized checkpoint: prune its full-precision weights")


# --- evaluation helpers ----------------------------------------------------------------------------

def _bos(folder: Path, model) -> int | None:
    """The id the tokenizer puts first (after any remapping), or None when it adds no BOS."""
    path = folder / "tokenizer_config.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return None if data.get("add_bos_token") is False else model.config.bos_token_id


def _check_texts() -> list[str]:
    """Held-out Korean texts for the tokenizer checks (none when the data set is not installed)."""
    from runtime.data import load_texts

    try:
        return load_texts("ko", split="eval")
    except KoedgeError:
        return []


def _special_ids(model) -> set[int]:
    """Every `*_token_id` of the config and generation config (they must survive vocabulary pruning)."""
    ids: set[int] = set()
    for holder in (model.config.to_dict(), model.generation_config.to_dict()):
        for key, value in holder.items():
            if key.endswith("token_id"):
                ids.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int) and v >= 0)
    return ids


def _evalset(folder: Path, split: str, count: int, bos: int | None):
    from exporter.prune.sensitivity import EvalSet
    from runtime.data import load_texts

    return EvalSet.from_texts(folder / "tokenizer.json", load_texts("ko", split=split)[:count], bos)


def _score(model, folder: Path, count: int, bos: int | None, reference=None):
    """Bits per byte (and KL against `reference`'s scorer, same tokenizer only) on eval texts."""
    from exporter.prune.sensitivity import Scorer

    vocab = model.get_input_embeddings().weight.shape[0]
    if reference is not None:
        return reference, reference.score(model)
    evalset = _evalset(folder, "eval", count, bos)
    keep = sum(len(ids) for ids in evalset.ids) * vocab * 2 <= 512 * 2**20
    scorer = Scorer(evalset, vocab, keep_reference=keep)
    return scorer, scorer.score(model)


# --- the pass -------------------------------------------------------------------------------------

def _copy_tokenizer_and_extras(source: Path, target: Path) -> None:
    for path in source.iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name not in SKIP_FILES \
                and path.name != "config.json":
            shutil.copy(path, target / path.name)


def prune_checkpoint(resolved, out: Path, options: PruneOptions,
                     progress: Callable[[str], None] = lambda message: None) -> dict:
    """Load `resolved`, prune it as `options` say, and save a checkpoint folder at `out` (created).

    The folder holds the weights, config, tokenizer, `koedge-passes.json` (this pass) and, after
    vocabulary pruning, `token_map.json`. Returns the pass results.
    """
    from exporter.export.convert import CHECKPOINT_PASSES, load_torch_model
    from exporter.prune.sensitivity import EvalSet
    from exporter.prune.sparsity import magnitude_prune
    from exporter.prune.structured import apply_structured, decoder_layers, record_shapes
    from exporter.prune.vocab import (check_tokenizer, plan_vocabulary, slice_embeddings, write_pruned_tokenizer,
                                      write_token_map)
    from runtime.bundle import PassRecord
    from runtime.data import load_texts

    if not options.active:
        raise KoedgeError("nothing to prune: give --vocab-size/--coverage, --ffn-ratio/--head-ratio/"
                          "--drop-layers/--plan, or --sparsity")
    if options.vocab:
        options.vocab.check()
    options.sparsity.check()
    if options.eval_texts < 0:
        raise KoedgeError("--eval-texts must be 0 or more")
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    _copy_tokenizer_and_extras(resolved.path, out)
    progress(f"loading {resolved.name} (fp32)")
    model = load_torch_model(resolved, "fp32")
    options.structured.check(len(decoder_layers(model)))
    results: dict = {"parameters_before": sum(p.numel() for p in model.parameters())}
    reference = None
    if options.eval_texts:
        progress(f"bits per byte of the unpruned model on {options.eval_texts} eval texts")
        reference, results["eval_before"] = _score(model, resolved.path, options.eval_texts,
                                                   _bos(resolved.path, model))
    if options.vocab:
        plan = plan_vocabulary(resolved.path, options.vocab, _special_ids(model), progress)
        write_pruned_tokenizer(resolved.path, out, plan)
        for stale in STALE_TOKENIZER_FILES:  # slow-tokenizer files would describe the old vocabulary
            (out / stale).unlink(missing_ok=True)
        slice_embeddings(model, plan)
        checks = check_tokenizer(resolved.path / "tokenizer.json", out / "tokenizer.json", plan, _check_texts())
        results["vocab"] = {**plan.stats, "token_map": write_token_map(out, plan, resolved.path),
                            "tokenizer_check": checks}
        reference = None  # different segmentation: KL against the old model is not position-aligned
        progress(f"vocabulary {plan.original_size:,} -> {len(plan.kept):,} tokens "
                 f"(calib coverage {plan.stats['corpus_coverage']:.4%}; round trip exact on "
                 f"{checks['round_trip_exact']}/{checks['texts']} eval texts)")
    bos = _bos(out, model)
    if options.structured.active:
        batches = []  # calibration text only matters to activation scores
        if options.structured.score == "activation":
            calib = EvalSet.from_texts(out / "tokenizer.json",
                                       load_texts("ko", split="calib")[: options.structured.calib_texts], bos)
            batches = calib.batches(model.config.vocab_size)
        results["structured"] = apply_structured(model, options.structured, batches, progress)
        results["structured"]["per_layer_shapes_in_config"] = record_shapes(model)
    if options.sparsity.sparsity > 0:
        results["sparsity"] = magnitude_prune(model, options.sparsity)
        progress(f"magnitude sparsity {results['sparsity']['sparsity']:.1%} of decoder linear weights")
    results["parameters_after"] = sum(p.numel() for p in model.parameters())
    if options.eval_texts:
        progress("bits per byte of the pruned model")
        _, results["eval_after"] = _score(model, out, options.eval_texts, bos, reference)
        before, after = results["eval_before"]["bits_per_byte"], results["eval_after"]["bits_per_byte"]
        results["delta_bpb_pct"] = round(100 * (after / before - 1), 3)
    model.save_pretrained(out)
    config = {"vocab": asdict(options.vocab) if options.vocab else None, "structured": asdict(options.structured),
              "sparsity": asdict(options.sparsity), "eval_texts": options.eval_texts}
    record = PassRecord("prune", config, round(time.perf_counter() - started, 1), results)
    earlier = resolved.path / CHECKPOINT_PASSES  # a checkpoint pruned before keeps its history
    history = json.loads(earlier.read_text(encoding="utf-8")) if earlier.is_file() else []
    (out / CHECKPOINT_PASSES).write_text(json.dumps([*history, asdict(record)], indent=2, ensure_ascii=False))
    return results


def prune_model(resolved, out: str | Path, options: PruneOptions, overwrite: bool = False,
                checkpoint_out: Path | None = None, progress: Callable[[str], None] = lambda message: None):
    """Prune, then export the pruned checkpoint to a bundle at `out`."""
    from exporter.export.convert import export_model
    from exporter.export.sources import ResolvedModel, cache_root

    if Path(out).exists() and not overwrite:
        raise KoedgeError(f"{out} exists; pass --overwrite to replace it")
    with tempfile.TemporaryDirectory(prefix="pruned-", dir=cache_root()) as scratch:
        checkpoint = checkpoint_out or Path(scratch) / "checkpoint"
        if checkpoint_out and checkpoint_out.exists():
            raise KoedgeError(f"{checkpoint_out} exists; choose a new folder for the pruned checkpoint")
        results = prune_checkpoint(resolved, checkpoint, options, progress)
        pruned = ResolvedModel(resolved.name, checkpoint, resolved.source, resolved.revision,
                               resolved.trust_remote_code, [*resolved.notes, describe_notes(results)])
        exported = export_model(pruned, out, overwrite=overwrite, progress=progress)
    return results, exported


def describe_notes(results: dict) -> str:
    parts = []
    if "vocab" in results:
        parts.append(f"vocabulary {results['vocab']['original_vocab_size']:,} -> {results['vocab']['vocab_size']:,}")
    if "structured" in results:
        parts.append("structured pruning")
    if "sparsity" in results:
        parts.append(f"{results['sparsity']['sparsity']:.0%} magnitude sparsity")
    return "pruned by koedge: " + ", ".join(parts)


def describe(results: dict) -> str:
    lines = [f"parameters {results['parameters_before']:,} -> {results['parameters_after']:,}"]
    if "vocab" in results:
        v = results["vocab"]
        lines.append(f"vocabulary {v['original_vocab_size']:,} -> {v['vocab_size']:,} (required {v['required']}, "
                     f"from corpus {v['from_corpus']:,}, prior fill {v['from_prior_fill']:,}; "
                     f"calib coverage {v['corpus_coverage']:.4%})")
    if "eval_before" in results:
        b, a = results["eval_before"], results["eval_after"]
        kl = f", KL {a['kl']:.4f}" if a.get("kl") is not None else ""
        lines.append(f"bits per byte {b['bits_per_byte']:.4f} -> {a['bits_per_byte']:.4f} "
                     f"({results['delta_bpb_pct']:+.2f}%{kl}) on {b['bytes']:,} bytes of eval text")
    return "\n".join(lines)


# --- sensitivity ------------------------------------------------------------------------------------

def run_sensitivity(resolved, options: PruneOptions, report: Path, ratios: list[float], threshold: float,
                    progress: Callable[[str], None]) -> dict:
    """The one-layer-at-a-time table and plot, on the model after any vocabulary pruning."""
    from exporter.prune.sensitivity import EvalSet, Scorer, SensitivityConfig, sensitivity, write_reports
    from exporter.prune.structured import decoder_layers
    from exporter.export.convert import load_torch_model
    from exporter.prune.vocab import plan_vocabulary, slice_embeddings, write_pruned_tokenizer
    from runtime.data import load_texts

    if any(not 0 < r < 1 for r in ratios):
        raise KoedgeError(f"sensitivity ratios must be in (0, 1), got {ratios}")
    if options.eval_texts < 1:
        raise KoedgeError("--sensitivity needs --eval-texts of at least 1")
    with tempfile.TemporaryDirectory(prefix="koedge-sensitivity-") as scratch:
        folder = Path(scratch)
        _copy_tokenizer_and_extras(resolved.path, folder)
        shutil.copy(resolved.path / "config.json", folder / "config.json")
        progress(f"loading {resolved.name} (fp32)")
        model = load_torch_model(resolved, "fp32")
        if options.vocab:
            plan = plan_vocabulary(resolved.path, options.vocab, _special_ids(model), progress)
            write_pruned_tokenizer(resolved.path, folder, plan)
            slice_embeddings(model, plan)
        bos = _bos(folder, model)
        vocab = model.config.vocab_size
        evalset = EvalSet.from_texts(folder / "tokenizer.json", load_texts("ko", split="eval")[: options.eval_texts], bos)
        calib = EvalSet.from_texts(folder / "tokenizer.json",
                                   load_texts("ko", split="calib")[: options.structured.calib_texts], bos)
        config = SensitivityConfig(ffn_ratios=tuple(ratios), head_ratios=tuple(ratios),
                                   score=options.structured.score)
        progress(f"sensitivity over {len(decoder_layers(model))} layers on {sum(map(len, evalset.ids)):,} tokens")
        base, rows = sensitivity(model, Scorer(evalset, vocab, record_layers=True), config, calib.batches(vocab), progress)
    meta = {"model": resolved.name, "score": config.score, "vocab_size": vocab,
            "eval_texts": options.eval_texts, "ratios": ratios}
    files = write_reports(report, base, rows, meta, threshold)
    return {"base": base, "rows": rows, "files": {k: str(report / v) for k, v in files.items()}}


# --- options --------------------------------------------------------------------------------------

def _layers(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise KoedgeError(f"--drop-layers must be comma-separated layer numbers, got '{text}'") from err


RECIPE_KEYS = ("vocab_size", "coverage", "corpus", "fill", "max_texts", "balance", "hanja", "ffn_ratio", "head_ratio", "drop_layers",
               "scope", "score", "steps", "multiple_of", "plan", "calib_texts", "sparsity", "sparsity_scope",
               "eval_texts")


def options_from_dict(config: dict) -> PruneOptions:
    """PruneOptions from flat settings (the CLI's option names with underscores; a recipe's pass table)."""
    from exporter.prune.structured import read_plan

    unknown = sorted(set(config) - set(RECIPE_KEYS))
    if unknown:
        raise KoedgeError(f"prune: unknown option(s) {', '.join(unknown)} (known: {', '.join(RECIPE_KEYS)})")
    get = config.get
    vocab = None
    if get("vocab_size") is not None or get("coverage") is not None:
        defaults = VocabConfig()
        corpus = get("corpus") or defaults.corpora
        vocab = VocabConfig(vocab_size=get("vocab_size"), coverage=get("coverage"),
                            corpora=[corpus] if isinstance(corpus, str) else list(corpus),
                            fill=get("fill", defaults.fill), max_texts=get("max_texts"),
                            balance=get("balance", defaults.balance), hanja=get("hanja", defaults.hanja))
    drops = get("drop_layers") or []
    plan = get("plan")
    structured = StructuredConfig(
        ffn_ratio=get("ffn_ratio", 0.0), head_ratio=get("head_ratio", 0.0),
        drop_layers=_layers(drops) if isinstance(drops, str) else list(drops),
        scope=get("scope", "local"), score=get("score", "weight"), steps=get("steps", 1),
        multiple_of=get("multiple_of", 8), plan=read_plan(plan) if isinstance(plan, str) else plan,
        calib_texts=get("calib_texts", 128))
    sparsity = SparsityConfig(get("sparsity", 0.0), get("sparsity_scope", "local"))
    return PruneOptions(vocab, structured, sparsity, get("eval_texts", 100))
