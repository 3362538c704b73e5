"""`koedge plan` (will it fit?) and `koedge build` (one command from model to phone bundle)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict


def cmd_plan(args: argparse.Namespace) -> int:
    from exporter.build.plan import format_plan, parse_size, plan, shape_from_config
    from exporter.export.sources import model_config

    shape = shape_from_config(args.model, model_config(args.model, args.revision))
    cap = parse_size(args.mem_cap)
    rows = plan(shape, args.context)
    if args.json:
        print(json.dumps({"model": asdict(shape), "mem_cap": cap, "context": args.context,
                          "rows": [{**asdict(row), "total": row.total, "fits": row.total <= cap} for row in rows]},
                         indent=2))
    else:
        print(format_plan(shape, rows, cap, args.context))
    return 0


def add_commands(commands) -> None:
    plan = commands.add_parser(
        "plan", help="predict memory per precision and say what fits under a cap",
        description="Before any work: weights + KV cache + activations for FP32/FP16/INT8/INT4, from the "
                    "model config alone, and which fit the memory cap.")
    plan.add_argument("--model", required=True, help="packaged name, checkpoint folder, config.json, or hub id")
    plan.add_argument("--mem-cap", default="3GiB", help="memory budget (default 3GiB)")
    plan.add_argument("--context", type=int, default=2048, help="tokens held in the KV cache (default 2048)")
    plan.add_argument("--revision", default=None)
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(func=cmd_plan)
    add_build_command(commands)


def cmd_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from exporter.build.engine import format_summary, run_recipe
    from exporter.cli.common import progress
    from exporter.recipes import load_recipe

    recipe = load_recipe(args.recipe)
    out = Path(args.out)
    outcomes = run_recipe(args.model, recipe, out, force=args.force, progress=progress)
    print(format_summary(recipe, outcomes))
    print(f"bundle: {out}\nreport: {out / 'report.json'}")
    return 0


def add_build_command(commands) -> None:
    from exporter.recipes import shipped_recipes

    build = commands.add_parser(
        "build", help="one command from model to phone bundle (a recipe of passes)",
        description="Export, prune, quantize, validate under the memory cap and evaluate, as a recipe says. "
                    "Each pass is cached by the hash of its input and config: re-running redoes only what changed.")
    build.add_argument("--model", required=True, help="packaged name, checkpoint folder, or hub id")
    build.add_argument("--recipe", default="phone-3gb",
                       help=f"shipped recipe ({', '.join(shipped_recipes())}) or a .toml file (default phone-3gb)")
    build.add_argument("--out", required=True, help="final bundle folder (an earlier bundle there is replaced)")
    build.add_argument("--force", action="store_true", help="redo every pass, ignoring the cache")
    build.set_defaults(func=cmd_build)
