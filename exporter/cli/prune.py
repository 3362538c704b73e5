"""`koedge prune`: arguments in, the prune pass (exporter.prune) out."""

from __future__ import annotations

import argparse
from pathlib import Path

from exporter.cli.common import progress
from exporter.prune import RECIPE_KEYS, options_from_dict, prune_model, refuse_bundle, run_sensitivity
from exporter.prune.pipeline import describe
from runtime.errors import KoedgeError


def _ratios(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise KoedgeError(f"ratios must be comma-separated numbers, got '{text}'") from err



def options_from(args: argparse.Namespace) -> PruneOptions:
    return options_from_dict({key: getattr(args, key) for key in RECIPE_KEYS if getattr(args, key) is not None})


def cmd_prune(args: argparse.Namespace) -> int:
    from exporter.export.sources import resolve_model

    refuse_bundle(args.model)
    options = options_from(args)
    if args.sensitivity:
        resolved = resolve_model(args.model, trust_remote_code=args.trust_remote_code, progress=progress)
        result = run_sensitivity(resolved, options, Path(args.report), _ratios(args.ratios), args.threshold, progress)
        print(f"unpruned {result['base']['bits_per_byte']:.4f} bits/byte; reports: "
              + ", ".join(result["files"].values()))
        return 0
    if not args.out:
        raise KoedgeError("--out is required (or use --sensitivity for the report only)")
    if not options.active:
        raise KoedgeError("nothing to prune: give --vocab-size/--coverage, --ffn-ratio/--head-ratio/"
                          "--drop-layers/--plan, or --sparsity")
    options.structured.check(10**6)  # ranges now; layer numbers once the model is loaded
    options.sparsity.check()
    if options.vocab:
        options.vocab.check()
    resolved = resolve_model(args.model, trust_remote_code=args.trust_remote_code, progress=progress)
    checkpoint = Path(args.checkpoint_out) if args.checkpoint_out else None
    results, exported = prune_model(resolved, args.out, options, args.overwrite, checkpoint, progress)
    print(describe(results))
    print(f"bundle {exported.folder}  {exported.bundle_bytes / 1e6:,.1f} MB")
    return 0


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "prune", help="prune a model (Korean vocabulary, FFN channels, heads, layers, sparsity) and export it",
        description="Shrink the torch model before export so ONNX shapes really get smaller, then export a "
                    "bundle. Prune before quantizing. See docs/pruning.md.")
    parser.add_argument("--model", required=True, help="packaged name, checkpoint folder or Hugging Face id")
    parser.add_argument("--out", help="bundle folder to create")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--checkpoint-out", help="also keep the pruned torch checkpoint in this new folder")
    parser.add_argument("--eval-texts", type=int, default=100,
                        help="eval-split Korean texts for bits per byte before/after (0: skip; default 100)")
    vocab = parser.add_argument_group("vocabulary pruning")
    size = vocab.add_mutually_exclusive_group()
    size.add_argument("--vocab-size", type=int, help="keep exactly N tokens")
    size.add_argument("--coverage", type=float, help="keep the most used tokens covering this share (0-1]")
    vocab.add_argument("--corpus", action="append",
                       help="texts to count on: ko, nsmc, klue (calib split) or a .txt/.jsonl file; repeatable "
                            "(default: nsmc and klue, informal and formal)")
    vocab.add_argument("--fill", choices=["ko-formal", "ko-en", "any", "none"], default="ko-formal",
                       help="what fills --vocab-size past the counted tokens (tokenizer prior order; ko-formal: "
                            "Hangul, then Hanja and symbols, then Hangul/ASCII pieces)")
    vocab.add_argument("--hanja", type=int, help="ko-formal fill: at most N single Hanja pieces (default 3000)")
    vocab.add_argument("--balance", action=argparse.BooleanOptionalAction, default=None,
                       help="weigh each corpus's counts equally (default on)")
    vocab.add_argument("--max-texts", type=int, default=None, help="count on at most N texts per corpus")
    structured = parser.add_argument_group("structured pruning")
    structured.add_argument("--ffn-ratio", type=float, default=0.0, help="share of FFN channels to remove [0, 1)")
    structured.add_argument("--head-ratio", type=float, default=0.0, help="share of query heads to remove [0, 1)")
    structured.add_argument("--drop-layers", help="comma-separated layer numbers to remove")
    structured.add_argument("--scope", choices=["local", "global"], default="local")
    structured.add_argument("--score", choices=["weight", "activation"], default="weight")
    structured.add_argument("--steps", type=int, default=1, help="iterative pruning in N rounds (re-scored)")
    structured.add_argument("--multiple-of", type=int, default=8, help="keep FFN widths a multiple of this")
    structured.add_argument("--plan", help="JSON plan with per-layer ratios (see --sensitivity)")
    structured.add_argument("--calib-texts", type=int, default=128, help="calibration texts for activation scores")
    sparsity = parser.add_argument_group("unstructured sparsity (no speed or size gain: see docs)")
    sparsity.add_argument("--sparsity", type=float, default=0.0, help="share of decoder weights to zero [0, 1)")
    sparsity.add_argument("--sparsity-scope", choices=["local", "global"], default="local")
    study = parser.add_argument_group("sensitivity study")
    study.add_argument("--sensitivity", action="store_true",
                       help="prune one layer at a time and write a table, plot and suggested plan")
    study.add_argument("--report", default="build/prune-sensitivity", help="folder for the sensitivity report")
    study.add_argument("--ratios", default="0.25,0.5,0.75", help="ratios for the sensitivity study")
    study.add_argument("--threshold", type=float, default=0.5,
                       help="suggested plan: per-layer Δ bits/byte budget in percent")
    parser.set_defaults(func=cmd_prune)
