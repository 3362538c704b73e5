"""The `koedge` command. It sits on top of both packages; heavy imports happen inside commands,
so `koedge run` / `validate` / `eval` work with the runtime dependencies alone."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
import time

from runtime.errors import KoedgeError


# Each module defines `add_commands(subparsers)`; kept apart so each area owns its commands.
COMMAND_MODULES = (
    "exporter.cli_runtime",  # run, chat, validate
    "exporter.cli_eval",  # eval
    "exporter.cli_quantize",  # quantize
    "exporter.cli_prune",  # prune
    "exporter.cli_build",  # build, plan
)


class _KnownNoise(logging.Filter):
    """Drops two warnings that misfire on koedge's own checkpoints and would alarm a user.

    transformers 4.57.6 flags any local tokenizer saved by a transformers > 4.57.2 as having
    Mistral's broken regex; Optimum reports the tied embedding as 'different candidate
    initializers', which koedge's export then stores once (exporter/export.py).
    """

    PHRASES = ("fix_mistral_regex", "candidate ONNX initializers", "lm_head.weight:", "embed_tokens.weight:")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(phrase in record.getMessage() for phrase in self.PHRASES)


def quiet_known_noise() -> None:
    for name in ("transformers.tokenization_utils_base", "optimum"):
        logging.getLogger(name).addFilter(_KnownNoise())


def progress(message: str) -> None:
    print(f"[koedge {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cmd_export(args: argparse.Namespace) -> int:
    from exporter.export import ExportConfig, describe_export, export_model
    from exporter.sources import resolve_model

    resolved = resolve_model(args.model, revision=args.revision, trust_remote_code=args.trust_remote_code,
                             progress=progress)
    config = ExportConfig(dtype=args.dtype, opset=args.opset, parity_tolerance=args.tolerance)
    result = export_model(resolved, args.out, config, overwrite=args.overwrite, progress=progress)
    print(describe_export(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="koedge",
        description="Take a Korean causal LM from a workstation to a phone: export, quantize, run, validate.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    export = commands.add_parser("export", help="export a model to an ONNX bundle with KV cache",
                                 description="Export a Hugging Face causal LM (or a packaged model) to a koedge "
                                             "bundle: ONNX with KV cache, tokenizer, manifest; checked against torch.")
    export.add_argument("--model", required=True,
                        help="packaged name (gemma-3-270m, smollm2-135m, polyglot-ko-1.3b-shape), "
                             "local checkpoint folder, or Hugging Face id")
    export.add_argument("--out", required=True, help="bundle folder to create")
    export.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset (default: Optimum's choice)")
    export.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    export.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (hub models)")
    export.add_argument("--tolerance", type=float, default=None, help="max |logit diff| vs torch (default by dtype)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    export.set_defaults(func=cmd_export)
    for module_name in COMMAND_MODULES:
        if importlib.util.find_spec(module_name) is not None:
            importlib.import_module(module_name).add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_known_noise()
    try:
        return args.func(args)
    except KoedgeError as err:
        print(f"koedge: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("koedge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
