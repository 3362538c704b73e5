"""`koedge eval`: perplexity, bits per byte, KL against a reference and Korean task accuracy.

Runs on the runtime alone (numpy, onnxruntime, tokenizers): a user can judge a bundle without torch.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from runtime.errors import KoedgeError


def _tasks(value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    return () if names in ((), ("none",)) else names


def cmd_eval(args: argparse.Namespace) -> int:
    from runtime.evaluate import EvalConfig, eval_texts, evaluate, format_table
    from runtime.model import CausalLM
    from runtime.session import SessionConfig
    from runtime.tasks import TASKS

    tasks = _tasks(args.tasks)
    unknown = [name for name in tasks if name not in TASKS]
    if unknown:
        raise KoedgeError(f"unknown task '{unknown[0]}' (choose from {', '.join(TASKS)}, or none)")
    config = EvalConfig(data=args.data, max_samples=args.max_samples, tokens_per_sample=args.tokens_per_sample,
                        window=args.window, tasks=tasks, task_samples=args.task_samples)
    texts = eval_texts(config)  # fail on bad data before loading models
    session = SessionConfig(threads=args.threads)
    model = CausalLM(args.bundle, session)
    reference = CausalLM(args.reference, session) if args.reference else None
    result = evaluate(model, texts, reference, config, show_progress=not args.quiet)
    if args.json:
        print(json.dumps({"bundle": str(args.bundle), "reference": args.reference, "config": asdict(config),
                          "result": result.to_dict()}, indent=2, ensure_ascii=False))
        return 0
    rows = [(model.folder.name, result)]
    print(format_table(rows))
    print(f"\n{result.passages} passages of '{config.data}' (eval split), {result.bytes:,} bytes"
          + (f"; KL against {reference.folder.name} on {result.kl_positions:,} positions" if reference else ""))
    for task in result.tasks.values():
        print(f"{task.name}: {task.correct}/{task.total} correct, chance {task.chance:.0%} ({task.note})")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "eval", help="accuracy of a bundle: perplexity, bits/byte, KL vs a reference, Korean tasks",
        description="Score a bundle on fixed Korean eval-split passages (the same text for every tokenizer): "
                    "perplexity, bits per byte, and with --reference the KL divergence, its 99th percentile "
                    "and same-top-1 (llama.cpp's definitions); plus zero-shot task accuracy with a 95% CI.")
    parser.add_argument("bundle", help="bundle folder")
    parser.add_argument("--reference", default=None, help="bundle to compare against (e.g. the FP32 one)")
    parser.add_argument("--data", default="ko", help="ko | nsmc | klue, or a .txt/.jsonl file (default: ko)")
    parser.add_argument("--max-samples", type=int, default=64, help="passages (default 64)")
    parser.add_argument("--tokens-per-sample", type=int, default=256,
                        help="passage size in tokens, as a byte budget of 3.5 bytes each (default 256)")
    parser.add_argument("--window", type=int, default=256, help="sliding window in tokens (default 256)")
    parser.add_argument("--tasks", default="nsmc", help="comma list of nsmc, klue-nli, or none (default nsmc)")
    parser.add_argument("--task-samples", type=int, default=200, help="examples per task (default 200)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default: all cores)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=cmd_eval)
