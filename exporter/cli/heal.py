"""`koedge heal`: arguments in, the heal pass (exporter.prune.heal) out."""

from __future__ import annotations

import argparse
from pathlib import Path

from exporter.cli.common import progress
from runtime.errors import KoedgeError


def cmd_heal(args: argparse.Namespace) -> int:
    from exporter.export.sources import resolve_model
    from exporter.prune.heal import HealConfig, describe, heal_checkpoint

    student = Path(args.student).expanduser()
    if (student / "koedge.json").is_file():
        raise KoedgeError(f"{student} is an exported bundle; heal the pruned checkpoint "
                          f"(koedge prune ... --checkpoint-out DIR keeps it)")
    if not (student / "config.json").is_file():
        raise KoedgeError(f"{student} is not a checkpoint folder (no config.json)")
    config = HealConfig(method=args.method, steps=args.steps, minutes=args.minutes, seq_len=args.seq_len,
                        batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=args.warmup_steps,
                        temperature=args.temperature,
                        kd_weight=args.kd_weight, lm_weight=args.lm_weight, lora_rank=args.lora_rank,
                        lora_alpha=args.lora_alpha, corpus=args.corpus, eval_texts=args.eval_texts,
                        gradient_checkpointing=args.gradient_checkpointing, save_every=args.save_every)
    config.check()
    out = Path(args.out)
    if out.exists():
        raise KoedgeError(f"{out} exists; choose a new folder for the healed checkpoint")
    work = Path(args.work) if args.work else out.with_name(f".{out.name}.heal-work")
    teacher = resolve_model(args.teacher, trust_remote_code=args.trust_remote_code, progress=progress)
    results = heal_checkpoint(teacher, resolve_model(str(student), trust_remote_code=args.trust_remote_code),
                              out, config, work, progress)
    print(describe(results))
    print(f"healed checkpoint {out}; export it with: koedge export --model {out} --out BUNDLE")
    return 0


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "heal", help="heal a pruned checkpoint by distilling the unpruned model into it (LoRA or full)",
        description="Knowledge distillation (KL at a temperature + next-token loss) from the unpruned teacher "
                    "into the pruned student on Korean calibration text; LoRA adapters are merged, so the "
                    "result exports and quantizes as usual. Interrupted runs resume from --work. "
                    "Scale to GPUs with `accelerate launch -m exporter.cli heal ...`. See docs/pruning.md.")
    parser.add_argument("--student", required=True, help="pruned checkpoint folder (koedge prune --checkpoint-out)")
    parser.add_argument("--teacher", required=True,
                        help="the model it was pruned from: packaged name, checkpoint folder or Hugging Face id")
    parser.add_argument("--out", required=True, help="healed checkpoint folder to create")
    parser.add_argument("--work", help="checkpoint folder for resuming (default: .OUT.heal-work beside --out)")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--minutes", type=float, help="time budget: stop and write the result when it is used")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, help="learning rate (default 1e-3 lora, 1e-4 full)")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--kd-weight", type=float, default=1.0)
    parser.add_argument("--lm-weight", type=float, default=0.5)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--corpus", default="ko", help="training texts: ko, nsmc, klue (calib split) or a file")
    parser.add_argument("--eval-texts", type=int, default=60, help="held-out texts scored before and after")
    parser.add_argument("--save-every", type=int, default=50, help="steps between resumable checkpoints")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.set_defaults(func=cmd_heal)
